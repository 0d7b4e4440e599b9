"""A prefill chunk's causal attention in one pass over its keys (`prefill_attention`,
models/csrc/attention.cpp) against a float64 reference: chunks with and without earlier context,
grouped-query head ratios 1-16, head dims 32-128, float32 and bfloat16, odd lengths; and the paged
attention path that uses it against the torch path it replaces."""

from __future__ import annotations

import pytest
import torch

from attention_node.paged_attention import _grouped_prefill


def _kernels():
    from models.cpu_kernels import cpu_kernels
    ext = cpu_kernels()
    if ext is None or not ext.has_prefill_attention():
        pytest.skip("no prefill attention kernel on this CPU (AVX-512)")
    return ext


def _reference(q, k, v):
    n, C = q.shape[0], k.shape[1]
    pos = torch.arange(C)
    bias = torch.zeros(n, C, dtype=torch.float64).masked_fill_(~(pos[None, :] <= pos[C - n:, None]), float("-inf"))
    return _grouped_prefill(q.double(), k.double(), v.double(), bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,C,h,g,d", [(512, 512, 8, 2, 64), (100, 300, 8, 2, 64), (37, 37, 4, 4, 32),
                                       (200, 260, 12, 2, 128), (1, 5, 8, 2, 64), (130, 130, 16, 1, 64),
                                       (17, 17, 6, 3, 48)])
def test_matches_float64_reference(dtype, n, C, h, g, d):
    ext = _kernels()
    gen = torch.Generator().manual_seed(n * 7 + C)
    q, k, v = (torch.randn(*s, generator=gen).mul_(2).to(dtype) for s in ((n, h, d), (g, C, d), (g, C, d)))
    got = ext.prefill_attention(q, k, v, d ** -0.5)
    assert got.dtype == dtype and got.shape == q.shape
    ref = _reference(q, k, v)
    err = (got.double() - ref).abs().max().item()
    if dtype == torch.float32:
        assert err < 5e-5, err
    else:   # float32 sums; only the output's bfloat16 rounding (and the inputs', shared with the reference)
        assert err <= ref.abs().max().item() * 2 ** -8 + 1e-6, err
    # no further from the reference than the torch path it replaces
    pos = torch.arange(C)
    bias = torch.zeros(n, C).masked_fill_(~(pos[None, :] <= pos[C - n:, None]), float("-inf"))
    torch_err = (_grouped_prefill(q, k, v, bias).double() - ref).abs().max().item()
    assert err <= max(torch_err * 1.5, 2e-6), (err, torch_err)


def test_refuses_what_it_cannot_take():
    ext = _kernels()
    with pytest.raises(RuntimeError, match="shapes"):
        ext.prefill_attention(torch.randn(8, 6, 64), torch.randn(4, 8, 64), torch.randn(4, 8, 64), 0.125)   # h % g
    with pytest.raises(RuntimeError, match="shapes"):
        ext.prefill_attention(torch.randn(9, 8, 64), torch.randn(2, 8, 64), torch.randn(2, 8, 64), 0.125)   # C < n
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ext.prefill_attention(torch.randn(8, 8, 64).double(), torch.randn(2, 8, 64).double(),
                              torch.randn(2, 8, 64).double(), 0.125)
