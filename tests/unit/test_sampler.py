import logging
import math

import pytest
import torch

from attention_node.sampler import filter_logits, sample
from scheduler.request import SamplingParams


def test_greedy_is_argmax_with_raw_logprobs():
    logits = torch.randn(4, 50)
    ids, lps = sample(logits, [SamplingParams(logprobs=True)] * 3 + [SamplingParams()], [0] * 4)
    assert ids == logits.argmax(-1).tolist()
    torch.testing.assert_close(torch.tensor(lps[:3]), torch.log_softmax(logits, -1).max(-1).values[:3])
    assert math.isnan(lps[3])            # not asked for: not computed


def test_seeded_sampling_is_reproducible_and_batch_independent():
    logits = torch.randn(3, 50)
    p = SamplingParams(temperature=1.0, seed=123)
    a, _ = sample(logits, [p, p, p], [0, 1, 2])
    b, _ = sample(logits[1:2], [p], [1])
    assert a[1] == b[0]
    draws = {tuple(sample(logits, [SamplingParams(temperature=1.0, seed=s)] * 3, [0, 1, 2])[0]) for s in range(20)}
    assert len(draws) > 1


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(2, 50)
    for p in (SamplingParams(temperature=0.7, top_k=1, seed=1), SamplingParams(temperature=0.7, top_p=1e-6, seed=1)):
        assert sample(logits, [p, p], [0, 0])[0] == logits.argmax(-1).tolist()


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.8)).isfinite().tolist()
    assert kept == [True, True, False, False]


# Issue #20, item 1: values validation accepts (finite, > 0 in float64) that are 0 or inf in float32.
BUG_VALUES = [dict(temperature=1.0, top_p=1e-300), dict(temperature=1.0, top_p=5e-324),
              dict(temperature=0.7, top_p=1e-300, top_k=3), dict(temperature=1e-40), dict(temperature=1e-300),
              dict(temperature=5e-324), dict(temperature=1e-45), dict(temperature=1e-37)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", BUG_VALUES, ids=[",".join(f"{k}={v}" for k, v in kw.items()) for kw in BUG_VALUES])
def test_bug_report_values_pick_the_top_token_and_spare_the_batch(dtype, kw):
    logits = (torch.randn(3, 50, generator=torch.Generator().manual_seed(7)) * 4).to(dtype)
    p = SamplingParams(seed=5, logprobs=True, **kw)
    ids, lps = sample(logits, [p, SamplingParams(logprobs=True), p], [0, 3, 9])
    assert ids == logits.argmax(-1).tolist()
    assert all(math.isfinite(lp) and lp <= 0 for lp in lps)
    assert kw.get("top_p", 1.0) == 1.0 or filter_logits(logits[0], p).isfinite().sum() == 1


def test_tiny_temperature_is_the_greedy_limit_uniform_over_ties():
    logits = torch.tensor([[5.0, 5.0, -1.0, float("-inf"), 4.9]])   # 1e-37: x / t overflows float32
    for t in (1e-37, 1e-40, 1e-300, 5e-324):
        picks = {sample(logits, [SamplingParams(temperature=t, seed=s)], [0])[0][0] for s in range(40)}
        assert picks == {0, 1}


def test_huge_temperature_is_uniform_over_unmasked_tokens_with_finite_logprobs():
    logits = torch.tensor([[3e38, -3e38, 0.0, float("-inf")]])
    got = {}
    for s in range(60):
        ids, lps = sample(logits, [SamplingParams(temperature=1e300, seed=s, logprobs=True)], [0])
        got[ids[0]] = lps[0]
    assert set(got) == {0, 1, 2}                       # never the masked token
    assert all(math.isfinite(lp) for lp in got.values())
    assert got[1] == pytest.approx(-6e38, rel=1e-6)   # x_j - max overflows float32: computed in float64
    assert SamplingParams(temperature=1.7e308).temperature == 1.7e308    # accepted, so it must sample
    assert sample(logits, [SamplingParams(temperature=1.7e308, seed=1)], [0])[0][0] in (0, 1, 2)


def test_top_k_beyond_vocab():
    logits = torch.randn(1, 8)
    for k in (8, 9, 10**30):
        ids, _ = sample(logits, [SamplingParams(temperature=1.0, top_k=k, seed=3)], [0])
        assert 0 <= ids[0] < 8


def test_invalid_rows_fall_back_to_greedy_alone_and_are_logged(caplog):
    nan, inf = float("nan"), float("inf")
    good = torch.randn(50)
    logits = torch.stack([good, torch.tensor([nan, 1.0, 2.0] + [0.0] * 47), torch.full((50,), -inf),
                          torch.tensor([1.0, inf, inf] + [0.0] * 47), good])
    p = [SamplingParams(temperature=0.9, top_p=0.95, seed=11, logprobs=True)] * 4 + [SamplingParams(logprobs=True)]
    with caplog.at_level(logging.WARNING, logger="shuttle.sampler"):
        ids, lps = sample(logits, p, [0, 1, 2, 3, 4])
    assert ids[0] == sample(good[None], p[:1], [0])[0][0]     # the valid row draws as if alone
    assert ids[1:] == [2, 0, 1, good.argmax().item()]
    assert all(math.isfinite(lp) for lp in lps)
    assert lps[2] == pytest.approx(-math.log(50)) and lps[3] == pytest.approx(-math.log(2))
    warned = [r.getMessage() for r in caplog.records if r.name == "shuttle.sampler"]
    assert len(warned) == 3 and [w.split()[2] for w in warned] == ["1", "2", "3"]
    assert all("seed=11" in w for w in warned)


def test_a_broken_filtered_row_falls_back_alone(monkeypatch, caplog):
    """Defence in depth: whatever makes one row's distribution invalid, that row goes greedy, logged once."""
    import attention_node.sampler as sampler
    real = sampler.filter_logits
    monkeypatch.setattr(sampler, "filter_logits",
                        lambda row, p: real(row, p) * (float("nan") if p.seed == 2 else 1.0))
    logits = torch.randn(3, 40)
    p = [SamplingParams(temperature=1.0, seed=s, logprobs=True) for s in (1, 2, 3)]
    with caplog.at_level(logging.WARNING, logger="shuttle.sampler"):
        ids, lps = sample(logits, p, [0, 0, 0])
    assert ids[1] == logits[1].argmax().item()
    assert [ids[0], ids[2]] == [sample(logits[i:i + 1], [p[i]], [0])[0][0] for i in (0, 2)]
    assert all(math.isfinite(lp) for lp in lps)
    assert [r.getMessage().split()[2] for r in caplog.records if r.name == "shuttle.sampler"] == ["1"]


@pytest.mark.parametrize("field,value", [("top_k", 2.5), ("top_k", float("nan")), ("temperature", 10 ** 400)])
def test_validation_refuses_what_the_sampler_cannot_take_exactly(field, value):
    from scheduler.request import InvalidRequest
    with pytest.raises(InvalidRequest, match=field):
        SamplingParams(**{field: value})
