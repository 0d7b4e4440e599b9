"""Property tests of the sampler over the whole domain `SamplingParams` accepts (issue #20, item 1).

Extreme temperatures / top_p / top_k / seeds (subnormals, 5e-324, 1e-300, 1e-40, 1e300, top_k up to
vocab + 5) on float32 and bfloat16 logits with very large magnitudes, -inf entries and ties."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attention_node.sampler import filter_logits, sample
from scheduler.request import SamplingParams

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

F32_MAX = torch.finfo(torch.float32).max
BF16_MAX = torch.finfo(torch.bfloat16).max
NEG_INF = float("-inf")

temperatures = st.one_of(
    st.sampled_from([0.0, 5e-324, 1e-320, 1e-310, 1e-300, 1e-45, 1e-40, 1e-38, 1.2e-38, 1e-30, 1e-6,
                     0.5, 1.0, 2.0, 1e30, 3.4e38, 1e39, 1e300, 1.7976931348623157e308]),
    st.floats(min_value=0.0, allow_nan=False, allow_infinity=False),
)
top_ps = st.one_of(
    st.sampled_from([5e-324, 1e-300, 1e-45, 1e-40, 1e-6, 0.5, 0.9, 1.0]),
    st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
)
seeds = st.one_of(st.none(), st.integers(0, 2**63), st.integers(0, 2**200))
logit_values = st.one_of(
    st.sampled_from([NEG_INF, 0.0, 1.0, -1.0, F32_MAX, -F32_MAX, 3e38, -3e38, 1e-45, -1e-45, 1e-40]),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.floats(-4.0, 4.0, width=32),
)


@st.composite
def batches(draw, invalid_rows: bool = False):
    """(logits [N, V] in float32 or bfloat16, params, output indices). Every row holds a finite
    entry and no NaN / +inf unless `invalid_rows`, which adds rows that break that."""
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    v = draw(st.integers(1, 24))
    n = draw(st.integers(1, 4))
    rows = []
    for _ in range(n):
        row = draw(st.lists(logit_values, min_size=v, max_size=v))
        if draw(st.booleans()):                      # ties: copy some entries onto others
            for i, j in draw(st.lists(st.tuples(st.integers(0, v - 1), st.integers(0, v - 1)), max_size=v)):
                row[i] = row[j]
        rows.append(row)
    x = torch.tensor(rows, dtype=torch.float32)
    if dtype == torch.bfloat16:                      # float32 values above bf16's max round to inf there
        x = x.clamp(-F32_MAX, BF16_MAX).to(torch.bfloat16)
        x = x.masked_fill(x == float("inf"), BF16_MAX)
    for r in range(n):                               # at least one finite entry per row
        if not x[r].isfinite().any():
            x[r, draw(st.integers(0, v - 1))] = draw(st.floats(-4.0, 4.0, width=16))
    bad = []
    if invalid_rows:
        for r in draw(st.lists(st.integers(0, n - 1), max_size=n, unique=True)):
            kind = draw(st.sampled_from(["nan", "+inf", "all -inf", "all nan"]))
            if kind == "all -inf":
                x[r] = NEG_INF
            elif kind == "all nan":
                x[r] = float("nan")
            else:
                x[r, draw(st.integers(0, v - 1))] = float("nan") if kind == "nan" else float("inf")
            bad.append(r)
    params = [SamplingParams(temperature=draw(temperatures), top_p=draw(top_ps), top_k=draw(st.integers(0, v + 5)),
                             seed=draw(seeds), logprobs=draw(st.booleans())) for _ in range(n)]
    index = draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n))
    return x, params, index, sorted(bad)


def second_gap(row: torch.Tensor) -> float:
    """max - next distinct finite value (float64); inf when every finite entry ties."""
    vals = sorted({v for v in row.double().tolist() if math.isfinite(v)}, reverse=True)
    return vals[0] - vals[1] if len(vals) > 1 else math.inf


@SETTINGS
@given(batches())
def test_sampling_is_safe_and_sensible_over_the_accepted_domain(batch):
    logits, params, index, _ = batch
    n, v = logits.shape
    ids, lps = sample(logits, params, index)

    assert len(ids) == n and len(lps) == n
    assert ids == sample(logits, params, index)[0]                    # seeded: reproducible
    argmax = logits.argmax(-1).tolist()
    for i, (tok, lp, p) in enumerate(zip(ids, lps, params)):
        row = logits[i].double()
        assert 0 <= tok < v
        assert math.isfinite(row[tok].item())                         # never a masked token
        assert math.isfinite(lp) if p.logprobs else math.isnan(lp)
        assert sample(logits[i:i + 1], [p], [index[i]])[0] == [tok]   # batch-independent
        if p.greedy:
            assert tok == argmax[i]
            continue
        if second_gap(row) / p.temperature > 200:                     # tiny temperature: greedy limit
            assert row[tok] == row.max()
        if p.top_p < 1 / (2 * v):                                     # tiny top_p: the top token of the
            tempered = filter_logits(logits[i], replace(p, top_k=0, top_p=1.0))  # sampler's (tempered) distribution
            assert tempered[tok] == tempered.max()
            if p.temperature == 1.0:                                  # x / 1 is x: the raw argmax
                assert row[tok] == row.max()


@SETTINGS
@given(batches(), st.sampled_from([5e-324, 1e-300, 1e-40, 1e-45]), st.sampled_from([5e-324, 1e-300, 1e-40]))
def test_bug_report_values_are_greedy_for_any_logits(batch, tiny_t, tiny_p):
    logits, params, index, _ = batch
    for p in (replace(params[0], temperature=tiny_t, top_p=1.0), replace(params[0], temperature=1.0, top_p=tiny_p)):
        ids, lps = sample(logits, [p] * logits.shape[0], index)
        for i, tok in enumerate(ids):
            row = logits[i].double()
            if p.top_p < 1.0 or second_gap(row) / p.temperature > 200:   # (1e-40 does not separate
                assert row[tok] == row.max()                               # logits 1e-45 apart)
            else:
                assert math.isfinite(row[tok].item())
            assert not p.logprobs or math.isfinite(lps[i])


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@SETTINGS
@given(batches(invalid_rows=True))
def test_invalid_rows_fall_back_alone_logged_once_and_never_raise(batch):
    logits, params, index, bad = batch
    logger = logging.getLogger("shuttle.sampler")
    handler = _Records()
    logger.addHandler(handler)
    try:
        ids, lps = sample(logits, params, index)
    finally:
        logger.removeHandler(handler)
    n, v = logits.shape
    assert len(handler.messages) == len(bad)                          # once per invalid row
    assert [int(m.split()[2]) for m in handler.messages] == bad       # "sampler: row <i> ..."
    for i, (tok, lp, p) in enumerate(zip(ids, lps, params)):
        assert 0 <= tok < v
        assert math.isfinite(lp) if p.logprobs else math.isnan(lp)
        if i in bad:
            row = logits[i].float()
            finite_or_pos = row.masked_fill(row.isnan(), NEG_INF)
            if finite_or_pos.isfinite().any() or (finite_or_pos == float("inf")).any():
                assert finite_or_pos[tok] == finite_or_pos.max()     # greedy, ignoring NaN
        else:                                                          # the other rows draw as if alone
            assert sample(logits[i:i + 1], [p], [index[i]])[0] == [tok]
