"""The screened greedy pick (`screened_greedy`, models/csrc/screen.cpp): the LM head read mostly as an
int8 copy, only the rows it cannot rule out computed exactly. It must pick what `row_max` over the
whole head's logits picks, index for index (ties: the first index), in float32 and bfloat16, at 1-8
rows; where it cannot decide (a non-finite x, too many rows left) it must say so rather than guess."""

from __future__ import annotations

import pytest
import torch

from models.linear import pack_panels, pack_screen


def _kernels(dtype: torch.dtype):
    from models.cpu_kernels import cpu_kernels
    ext = cpu_kernels()
    if ext is None or not ext.has_panel_linear() or not ext.has_head_screen() or \
            (dtype == torch.bfloat16 and not ext.has_bf16_panels()):
        pytest.skip(f"no screened {dtype} LM head on this CPU (AVX-512 BW and panel kernels)")
    return ext


def _whole(ext, x, panels):
    return ext.row_max(ext.panel_linear(x, panels).float().contiguous())


def _check(ext, w, x, max_rows=None):
    panels, (q, rows) = pack_panels(w), pack_screen(w)
    top, arg = _whole(ext, x, panels)
    got_top, got_arg, exact = ext.screened_greedy(x, panels, q, rows, max_rows or w.shape[0] // 8)
    assert exact > 0, "the screen could not decide"
    assert got_arg.tolist() == arg.tolist()
    assert torch.equal(got_top, top)
    return exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
def test_screened_pick_is_the_whole_heads(dtype, rows):
    ext = _kernels(dtype)
    g = torch.Generator().manual_seed(rows)
    V, H = 4096, 256
    w = (torch.randn(V, H, generator=g) * 0.02).to(dtype)
    exact = []
    for trial in range(20):
        scale = [0.1, 1.0, 30.0][trial % 3]          # x's spread changes its int16 scale and the bounds
        x = (torch.randn(rows, H, generator=g) * scale).to(dtype)
        x[:, trial % H] *= 40                        # an outlier dimension, as trained models have
        exact.append(_check(ext, w, x))
    assert max(exact) <= V // 8 and sorted(exact)[len(exact) // 2] < V // 16, exact   # a screen, not the head again


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_and_near_ties_go_to_the_first_index(dtype):
    ext = _kernels(dtype)
    g = torch.Generator().manual_seed(7)
    V, H = 2048, 128
    w = (torch.randn(V, H, generator=g) * 0.02).to(dtype)
    x = torch.randn(3, H, generator=g).to(dtype)
    best = int((x[0].float() @ w.float().T).argmax())
    w[1999] = w[best]                                # an exact copy later: a tie, the first index wins
    w[5] = w[best]                                   # and earlier: now row 5 is the pick
    w[600] = w[best]
    w[600, 0] += torch.finfo(dtype).eps * w[best, 0].abs().clamp(min=1e-3)   # one ulp off, near the max
    _check(ext, w, x)
    # every row within a hair of another: the int8 copy cannot tell them apart, the exact rows must
    near = w[best].float() + 1e-6 * torch.randn(40, H, generator=g)
    w[100:140] = near.to(dtype)
    _check(ext, w, x)


def test_the_int8_copy_ranking_rows_the_wrong_way_does_not_fool_it():
    """Rows built so that the int8 copy puts B ahead of A by half its error bound while the head puts A
    ahead: every weight of A sits 0.49 of a step above its int8 value; B's sit 0.51 above on half the
    dimensions (rounded up a whole step) and 0.49 below on the rest. A screen whose bound were a tenth
    of what it is would rule A out and pick B."""
    ext = _kernels(torch.float32)
    V, H = 1024, 256
    g = torch.Generator().manual_seed(3)
    w = torch.randn(V, H, generator=g) * 1e-3
    x = (torch.rand(1, H, generator=g) + 0.5)            # positive: every error adds up in one direction
    a, b = 700, 300                                      # B earlier than A: a tie would go to B
    w[a] = 100.49
    w[b, : H // 2], w[b, H // 2:] = 100.51, 99.51
    w[a, 0] = w[b, 0] = 127                              # both rows' int8 step: exactly 1 (times 1e-3 below)
    w[[a, b]] *= 1e-3
    exact = (x.double() @ w.double().T)[0]
    assert int(exact.argmax()) == a
    assert _check(ext, w, x) > 0


def test_a_screen_that_cannot_decide_says_so():
    ext = _kernels(torch.float32)
    V, H = 1024, 64
    w = torch.randn(V, H) * 0.02
    panels, (q, rows) = pack_panels(w), pack_screen(w)
    x = torch.randn(2, H)
    x[1, 3] = float("nan")
    top, arg, exact = ext.screened_greedy(x, panels, q, rows, V // 8)
    assert exact == 0 and top is None and arg is None           # the caller computes the whole head
    same = torch.randn(1, H).expand(V, H).contiguous()          # every row equal: all tie, all kept
    _, _, exact = ext.screened_greedy(torch.randn(1, H), pack_panels(same), *pack_screen(same), V // 8)
    assert exact == 0
    with pytest.raises(RuntimeError, match="rows"):
        ext.screened_greedy(torch.randn(9, H), panels, q, rows, V // 8)


def test_no_screen_for_what_the_kernel_does_not_take(monkeypatch):
    _kernels(torch.float32)
    assert pack_screen(torch.randn(1000, 64)) is None            # rows not a multiple of 16
    bad = torch.randn(1024, 64)
    bad[7, 7] = float("inf")
    assert pack_screen(bad) is None
    monkeypatch.setenv("SHUTTLE_HEAD_SCREEN", "0")
    assert pack_screen(torch.randn(1024, 64)) is None


def test_extreme_heads_are_left_to_the_whole_head():
    """Where the head itself could overflow, or (bfloat16) reads denormal weights as zero, the screen's
    pick must still be the whole head's, or it must give up (a second reader's counterexamples)."""
    ext = _kernels(torch.float32)
    w = torch.zeros(32, 2)
    w[:16] = torch.tensor([1e6, 0.0])
    w[16:] = torch.tensor([1e10, 1e10])
    x = torch.tensor([[1e29, -1e29]])
    _, _, exact = ext.screened_greedy(x, pack_panels(w), *pack_screen(w), 32)
    assert exact == 0                          # the head's own sums overflow: its NaN/inf rules decide
    if not ext.has_bf16_panels():
        return
    tiny = 2.0 ** -126
    w = torch.zeros(32, 2)
    w[:16] = torch.tensor([1.5 * tiny, -(1 + 65 / 128) * tiny])
    w[16:] = torch.tensor([-tiny / 2, -tiny / 2])
    w, x = w.to(torch.bfloat16), torch.tensor([[2.0 ** 80, 2.0 ** 80]]).to(torch.bfloat16)
    panels = pack_panels(w)
    _, arg = _whole(ext, x, panels)
    _, got, exact = ext.screened_greedy(x, panels, *pack_screen(w), 32)
    assert exact == 0 or got.tolist() == arg.tolist()
