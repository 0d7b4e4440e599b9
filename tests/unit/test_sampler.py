import math

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
