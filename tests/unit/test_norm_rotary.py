"""The CPU kernels for RMSNorm and rotary embeddings against the torch formulas Hugging Face uses,
float32 and bfloat16 (rounded where the HF modules round), and the forward pass choosing them."""

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
