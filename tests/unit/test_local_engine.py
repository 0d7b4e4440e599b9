"""The in-process harness used by tests/gpu, checked on the CPU against Hugging Face."""

import torch

from local_ranks import local_engine
from scheduler.config import EngineConfig
from scheduler.request import SamplingParams
from tiny_models import hf_generate

PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2], [7]]


def test_local_engine_matches_hugging_face(tiny_model):
    model = tiny_model("qwen2_moe")
    ref_tokens, ref_logits = hf_generate(model, PROMPTS, 8)
    engine = local_engine(model, EngineConfig(attention_ranks=2, expert_ranks=3, micro_batches=2, max_batch_tokens=8),
                          return_logits=True)
    out = engine.generate(PROMPTS, SamplingParams(max_tokens=8))
    assert [c.token_ids for c in out] == ref_tokens
    assert max((torch.tensor(c.logits) - ref).abs().max().item() for c, ref in zip(out, ref_logits)) <= 1e-4


def test_attention_rank_threads_follow_the_step_size(tiny_model, monkeypatch):
    """A rank told (1, 2) threads runs decode-sized steps' layers on 1 thread, prefill-sized steps' layers
    and every LM head on 2, and computes the same tokens as Hugging Face."""
    import attention_node.rank as rank_mod

    model = tiny_model("mixtral")
    prompts = [[(7 * i) % 250 + 1 for i in range(rank_mod.SMALL_STEP_TOKENS + 40)], [5, 6, 7]]
    ref_tokens, _ = hf_generate(model, prompts, 4)
    engine = local_engine(model, EngineConfig(schedule_ahead=0))
    rank = engine.ranks.attention[0]
    rank.threads = (1, 2)
    calls = []
    real, before = torch.set_num_threads, torch.get_num_threads()
    monkeypatch.setattr(rank_mod.torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    try:
        out = engine.generate(prompts, SamplingParams(max_tokens=4))
    finally:
        real(before)
    assert [c.token_ids for c in out] == ref_tokens
    steps = [calls[i:i + 2] for i in range(0, len(calls), 2)]
    assert len(calls) == 2 * len(steps) and steps[0] == [2, 2]       # the long prompt's prefill: 2 threads throughout
    assert steps[1:] and all(s == [1, 2] for s in steps[1:])          # decode steps: layers on 1, LM head on 2
