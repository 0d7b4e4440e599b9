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
    engine = local_engine(model, EngineConfig(attention_ranks=2, expert_ranks=3, micro_batches=2, max_batch_tokens=8))
    engine.return_logits = True
    out = engine.generate(PROMPTS, SamplingParams(max_tokens=8))
    assert [c.token_ids for c in out] == ref_tokens
    assert max((torch.tensor(c.logits) - ref).abs().max().item() for c, ref in zip(out, ref_logits)) <= 1e-4
