"""The small CPU kernels against what they replace: RMSNorm and rotary embeddings against the torch
formulas Hugging Face uses (float32 and bfloat16, rounded where the HF modules round), the greedy
row maximum against torch's amax/argmax (NaN, infinities, ties), the KV cache write against
index_copy_; and the callers choosing them."""

from __future__ import annotations

import pytest
import torch

from attention_node import forward
from models import cpu_kernels


def hf_rms_norm(x, weight, eps):
    """Mixtral/Qwen RMSNorm as transformers writes it."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def hf_rotary(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def assert_close_in(dtype, got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:   # float32 sums in another order may move a bfloat16 rounding by one step, rarely
        diff = (got.float() - want.float()).abs()
        assert (diff <= want.float().abs() * 2 ** -7 + 1e-6).all()
        assert diff.numel() == 0 or (diff == 0).float().mean() > 0.97


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 512), (64, 512), (3, 8, 64), (0, 512)])
def test_rms_norm_matches_hf(dtype, shape):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3).to(dtype)
    w = (torch.rand(shape[-1]) + 0.5).to(dtype)
    ext = cpu_kernels.cpu_kernels()
    assert_close_in(dtype, ext.rms_norm(x, w, 1e-6), hf_rms_norm(x, w, 1e-6))
    assert_close_in(dtype, forward.rms_norm(x, w, 1e-6), hf_rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 37])
def test_rotary_matches_hf_on_a_strided_view(dtype, T):
    """q and k are rotated straight from the fused qkv output: a view whose token stride spans v too."""
    torch.manual_seed(T)
    h, g, d = 8, 2, 64
    qkv = torch.randn(T, (h + 2 * g) * d).to(dtype)
    x = qkv[:, :(h + g) * d].view(T, h + g, d)
    table = forward.RotaryTable(d, 10000.0, 128, dtype, torch.device("cpu"))
    cos_sin = table.at(torch.randint(0, 128, (T,)))
    want = hf_rotary(x, *cos_sin)
    ext = cpu_kernels.cpu_kernels()
    assert_close_in(dtype, ext.rotary(x, *cos_sin), want)
    assert_close_in(dtype, forward.RotaryTable.apply(x, cos_sin), want)


def test_kernels_refuse_what_they_cannot_read():
    ext = cpu_kernels.cpu_kernels()
    with pytest.raises(RuntimeError, match="rms_norm: expected x"):
        ext.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6)
    with pytest.raises(RuntimeError, match="one dtype"):
        ext.rms_norm(torch.randn(2, 8), torch.ones(8).bfloat16(), 1e-6)
    with pytest.raises(RuntimeError, match="one row of 8 per token"):
        ext.rotary(torch.randn(3, 2, 8), torch.randn(2, 8), torch.randn(2, 8))
    with pytest.raises(RuntimeError, match="even d"):
        ext.rotary(torch.randn(3, 2, 7), torch.randn(3, 7), torch.randn(3, 7))


def test_other_dtypes_keep_torch_ops():
    x, w = torch.randn(4, 16, dtype=torch.float64), torch.rand(16, dtype=torch.float64)
    assert cpu_kernels.for_tensor(x) is None
    torch.testing.assert_close(forward.rms_norm(x, w, 1e-6), hf_rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("V", [1, 15, 32000])
def test_row_max_is_torchs_amax_and_argmax(V):
    torch.manual_seed(V)
    x = torch.randn(8, V)
    x[1, V // 2] = float("nan")                       # NaN wins, the first one
    x[1, V - 1] = float("nan")
    x[2] = float("-inf")                              # nothing finite: index 0
    x[3, V - 1] = float("inf")
    x[3, 0] = float("inf")                            # +inf twice: the first
    x[4, :] = 0.0
    x[4, V // 3] = -0.0                               # equal zeros: the first
    x[5, V - 1] = x[5].max() + 1
    x[6, 0] = x[6].max()                              # a tie with a later entry: the first
    values, index = cpu_kernels.cpu_kernels().row_max(x)
    assert index.tolist() == x.argmax(-1).tolist()
    torch.testing.assert_close(values, x.amax(-1), equal_nan=True)


def test_sampler_takes_the_kernel_for_float32_logits():
    from attention_node import sampler
    x = torch.randn(3, 100)
    assert cpu_kernels.for_tensor(x) is not None
    top, ids = sampler._row_max(x)
    assert ids.tolist() == x.argmax(-1).tolist() and torch.equal(top, x.amax(-1))
    with pytest.raises(RuntimeError, match="row_max: expected contiguous float32"):
        cpu_kernels.cpu_kernels().row_max(x.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_is_index_copy(dtype):
    """k and v come as views of the fused projection (token strides spanning other heads)."""
    torch.manual_seed(0)
    g, S, d, T = 2, 64, 16, 5
    caches = [torch.randn(g, S, d).to(dtype) for _ in range(2)]
    caches += [c.clone() for c in caches]
    qkv = torch.randn(T, (8 + 2 * g) * d).to(dtype)
    k = qkv[:, 8 * d:(8 + g) * d].view(T, g, d)
    v = qkv[:, (8 + g) * d:].view(T, g, d)
    slots = torch.tensor([3, 60, 0, 17, 33])
    cpu_kernels.cpu_kernels().kv_write(caches[0], caches[1], slots, k, v)
    caches[2].index_copy_(1, slots, k.transpose(0, 1))
    caches[3].index_copy_(1, slots, v.transpose(0, 1))
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    with pytest.raises(RuntimeError, match="slot 64 out of range for 64"):
        cpu_kernels.cpu_kernels().kv_write(caches[0], caches[1], torch.tensor([1, 2, 3, 4, 64]), k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_topk_matches_softmax_topk(dtype, renormalize):
    """The router's softmax top-k in one call against torch's softmax, topk and division: the same
    experts in the same order (float32 logits: no ties) and weights within float rounding, in x's dtype."""
    ext = cpu_kernels.cpu_kernels()
    torch.manual_seed(0)
    logits = torch.randn(37, 16) * 3
    x = torch.randn(37, 8).to(dtype)
    ids, weights = ext.route_topk(logits, x, 2, renormalize)
    probs = torch.softmax(logits, dim=-1)
    want_w, want_ids = torch.topk(probs, 2, dim=-1)
    if renormalize:
        want_w = want_w / want_w.sum(-1, keepdim=True)
    assert torch.equal(ids, want_ids) and weights.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2 ** -8
    assert torch.allclose(weights.float(), want_w, atol=tol, rtol=tol)
    # bfloat16 logits, ties broken toward the lower expert
    tied = torch.tensor([[0.5, 2.0, 2.0, -1.0]], dtype=torch.bfloat16)
    ids, weights = ext.route_topk(tied, tied, 2, renormalize)
    assert ids.tolist() == [[1, 2]] and weights.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="top-5 of 4 experts"):
        ext.route_topk(tied, tied, 5, renormalize)
