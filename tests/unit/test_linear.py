"""models.linear.Linear against F.linear, for every layout it may pick: the panel kernel, oneDNN, plain."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import cpu_kernels
from models.linear import PREPACK_MIN_ELEMENTS, Linear


@pytest.mark.parametrize("rows", [0, 1, 3, 8, 9, 17, 64, 130])
@pytest.mark.parametrize("out_features,in_features", [(2048, 512), (512, 1024), (256, 300)])
def test_panel_linear_matches_f_linear(rows, out_features, in_features):
    torch.manual_seed(rows)
    w = torch.randn(out_features, in_features) * 0.05
    lin = Linear(w.clone())
    assert lin.panels is not None and lin.packed is None     # this machine builds the kernels (CI does too)
    x = torch.randn(rows, in_features)
    assert torch.allclose(lin(x), F.linear(x, w), atol=1e-5, rtol=1e-5)


def test_panel_linear_with_bias_and_leading_dims():
    w, b = torch.randn(512, 256) * 0.05, torch.randn(512)
    lin = Linear(w.clone(), b)
    x = torch.randn(2, 5, 256)
    y = lin(x)
    assert y.shape == (2, 5, 512)
    assert torch.allclose(y, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    assert torch.allclose(lin(x[0, :3].t().contiguous().t()), F.linear(x[0, :3], w, b), atol=1e-5)   # a non-contiguous input


def test_layout_choice(monkeypatch):
    big = torch.randn(512, 256)
    assert Linear(big).panels is not None
    odd = Linear(torch.randn(516, 256))                    # not a multiple of 8 rows: oneDNN
    assert odd.panels is None and odd.packed is not None
    small = Linear(torch.randn(64, 64))                    # below PREPACK_MIN_ELEMENTS: plain F.linear
    assert 64 * 64 < PREPACK_MIN_ELEMENTS and small.panels is None and small.packed is None
    half = Linear(big.bfloat16())
    assert half.panels is None and half.packed is None
    monkeypatch.setattr(cpu_kernels, "_built", {})
    monkeypatch.setenv("SHUTTLE_CPU_KERNELS", "0")
    off = Linear(big)
    assert off.panels is None and off.packed is not None
    x = torch.randn(7, 256)
    assert torch.allclose(off(x), F.linear(x, big), atol=1e-4, rtol=1e-5)


def test_panel_linear_rejects_mismatched_inputs():
    ext = cpu_kernels.cpu_kernels()
    panels = torch.randn(4, 16, 8)
    with pytest.raises(RuntimeError, match="expected x"):
        ext.panel_linear(torch.randn(3, 15), panels)
    with pytest.raises(RuntimeError, match="float32 only"):
        ext.panel_linear(torch.randn(3, 16).double(), panels.double())
