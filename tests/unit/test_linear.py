"""models.linear.Linear against F.linear, for every layout it may pick: the panel kernel, oneDNN, plain."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import cpu_kernels
from models.linear import PREPACK_MIN_ELEMENTS, Linear


# rows (AVX-512's 16-column panels): up to 3 one panel at a time; 4-8 one tile over a panel pair, its
# block transposed; 9+ tiles of up to 12 over pairs, spread evenly (13 = 7+6, 37 = 10+9+9+9); (272, 256)
# has an odd panel count: the last panel alone, in tiles of up to 8 (AVX2's 8-column panels: up to 8
# rows one panel at a time, more in tiles of up to 6 over pairs)
@pytest.mark.parametrize("rows", [0, 1, 3, 4, 8, 9, 12, 13, 17, 37, 64, 130])
@pytest.mark.parametrize("out_features,in_features", [(2048, 512), (512, 1024), (256, 300), (272, 256)])
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
    cols = cpu_kernels.cpu_kernels().float_panel_cols()
    assert cols == 16                                      # this CPU has AVX-512 (CI's does too)
    odd = Linear(torch.randn(520, 256))                    # not a multiple of the panel width: oneDNN
    assert odd.panels is None and odd.packed is not None
    assert Linear(big).panels.shape == (512 // cols, 256, cols)
    router_w = torch.randn(16, 512)
    router = Linear(router_w)                              # any size with a whole number of panels (a router)
    assert 16 * 512 < PREPACK_MIN_ELEMENTS and router.panels is not None
    x = torch.randn(3, 512)
    assert torch.allclose(router(x), F.linear(x, router_w), atol=1e-4, rtol=1e-5)
    small = Linear(torch.randn(60, 64))                    # small and not a whole number of panels: plain F.linear
    assert small.panels is None and small.packed is None
    half = Linear(big.bfloat16())                          # this CPU has AVX-512 BF16 (CI's does too)
    assert half.panels is not None and half.panels.dtype == torch.bfloat16 and half.packed is None
    assert Linear(torch.randn(520, 256).bfloat16()).panels is None      # bfloat16 panels are 16 columns wide
    assert Linear(big.half()).panels is None
    monkeypatch.setattr(cpu_kernels, "_built", {})
    monkeypatch.setenv("SHUTTLE_CPU_KERNELS", "0")
    off = Linear(big)
    assert off.panels is None and off.packed is not None
    x = torch.randn(7, 256)
    assert torch.allclose(off(x), F.linear(x, big), atol=1e-4, rtol=1e-5)


# bfloat16 panels: up to 8 rows one panel at a time; more over panel pairs, in tiles of up to 12 rows
# spread evenly (13 = 7+6, 37 = 10+9+9+9); (272, 300) has an odd panel count (the last one alone)
@pytest.mark.parametrize("rows", [0, 1, 5, 8, 9, 12, 13, 37, 130])
@pytest.mark.parametrize("out_features,in_features", [(2048, 512), (512, 1024), (272, 300)])
def test_bfloat16_panels_match_a_float32_product_rounded_once(rows, out_features, in_features):
    """bfloat16 weights and inputs, float32 sums, the result rounded to bfloat16 once: within one
    bfloat16 rounding of the exact product (F.linear in bfloat16 rounds too, by its own summation)."""
    torch.manual_seed(rows)
    w = (torch.randn(out_features, in_features) * 0.05).bfloat16()
    lin = Linear(w.clone())
    assert lin.panels is not None and lin.panels.dtype == torch.bfloat16
    x = torch.randn(rows, in_features).bfloat16()
    y = lin(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, out_features)
    exact = x.double() @ w.double().t()
    assert torch.allclose(y.double(), exact, rtol=2 ** -8, atol=1e-6)
    if rows:
        close = F.linear(x, w).double()
        assert (y.double() - exact).abs().max() <= (close - exact).abs().max() + 1e-6


def test_bfloat16_panels_refuse_float32_inputs_by_name():
    lin = Linear(torch.randn(512, 256).bfloat16())
    with pytest.raises(RuntimeError, match="expected a contiguous BFloat16 CPU x"):
        lin(torch.randn(3, 256))


def test_panel_linear_rejects_mismatched_inputs():
    ext = cpu_kernels.cpu_kernels()
    panels = torch.randn(4, 16, ext.float_panel_cols())
    with pytest.raises(RuntimeError, match="K = 15"):
        ext.panel_linear(torch.randn(3, 15), panels)
    with pytest.raises(RuntimeError, match="expected float32 panels"):
        ext.panel_linear(torch.randn(3, 16).double(), panels.double())
    with pytest.raises(RuntimeError, match="expected float32 panels"):          # the other CPU's width
        ext.panel_linear(torch.randn(3, 16), torch.randn(8, 16, 24 - ext.float_panel_cols()))
    with pytest.raises(RuntimeError, match="expected a contiguous Float CPU x"):
        ext.panel_linear(torch.randn(3, 16).double(), panels)


@pytest.mark.parametrize("reverse", [False, True])
def test_grouped_panel_linear_matches_per_block_products(reverse):
    """Row block w of x times weight w, all weights in one call: empty blocks, every tile shape
    (single panels, pairs, transposed blocks or not), an odd panel count (272 outputs)."""
    torch.manual_seed(0)
    counts = [0, 1, 4, 8, 9, 12, 37, 0, 130, 3]
    ws = [torch.randn(272, 256) * 0.05 for _ in counts]
    lins = [Linear(w.clone()) for w in ws]
    x = torch.randn(sum(counts), 256)
    y = lins[0]._kernels.grouped_panel_linear(x, counts, [lin.panels for lin in lins], reverse)
    want = torch.cat([F.linear(block, w) for block, w in zip(x.split(counts), ws)])
    assert torch.allclose(y, want, atol=1e-5, rtol=1e-5)


def test_grouped_panel_linear_rejects_mismatched_inputs():
    ext = cpu_kernels.cpu_kernels()
    cols = ext.float_panel_cols()
    panels = [torch.randn(4, 16, cols), torch.randn(4, 16, cols)]
    with pytest.raises(RuntimeError, match="sum to 5, x has 6 rows"):
        ext.grouped_panel_linear(torch.randn(6, 16), [2, 3], panels, False)
    with pytest.raises(RuntimeError, match="one row count per weight"):
        ext.grouped_panel_linear(torch.randn(5, 16), [5], panels, False)
    with pytest.raises(RuntimeError, match=f"weight 1 has {8 * cols} outputs, weight 0 has {4 * cols}"):
        ext.grouped_panel_linear(torch.randn(5, 16), [2, 3], [panels[0], torch.randn(8, 16, cols)], False)
