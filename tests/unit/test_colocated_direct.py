"""A colocated node with one expert rank: the attention rank calls the expert rank's `compute_rows`
directly each layer (`AttentionEndpoint.inline_experts`) instead of dispatch + combine through the
in-process backend. Both must give the same tokens and logits bit for bit, and the expert rank must
count the same work either way; two expert ranks keep the dispatch path."""

from __future__ import annotations

import pytest
import torch

import transfer.inprocess as inprocess
from cluster.colocated import ColocatedRanks
from models.spec import load_spec
from scheduler.config import EngineConfig, EngineLimits
from scheduler.engine import Engine, InProcessRanks
from scheduler.placement import Placement
from scheduler.request import SamplingParams

PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2], [7], [2, 7, 1, 8, 2, 8]]
WIDE = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2)


class _Colocated(InProcessRanks):
    def __init__(self, ranks: ColocatedRanks):
        self.ranks = ranks

    def run_step(self, plans):
        return [self.ranks.step(plans[0])]

    def shutdown(self):
        self.ranks.shutdown()


def _run(model: str, dtype: str, expert_ranks: int, monkeypatch, direct: bool, calls: list):
    real = inprocess.InProcessAttention.inline_experts

    def offered(self):
        fn = real(self) if direct else None
        if fn is None:
            return None

        def counted(*args):
            calls.append(args[1])
            return fn(*args)
        return counted
    monkeypatch.setattr(inprocess.InProcessAttention, "inline_experts", offered)
    spec = load_spec(model)
    config = EngineConfig(dtype=dtype, max_batch_tokens=16, colocate=True, expert_ranks=expert_ranks)
    limits = EngineLimits.derive(config, max_position_embeddings=spec.max_position_embeddings,
                                 vocab_size=spec.vocab_size, eos_token_ids=spec.eos_token_ids)
    placement = Placement.contiguous(spec.num_experts, expert_ranks)
    ranks = ColocatedRanks(spec, config, limits, model, "cpu", None,
                           [placement.experts_of(e) for e in range(expert_ranks)])
    engine = Engine(config, limits, _Colocated(ranks), return_logits=True)
    try:
        out = engine.generate(PROMPTS, SamplingParams(max_tokens=6))
        stats = ranks.check_health()
    finally:
        engine.shutdown()
    return out, stats


@pytest.mark.parametrize("family,dtype", [("mixtral", "float32"), ("mixtral", "bfloat16"), ("qwen2_moe", "float32")])
def test_direct_expert_calls_are_bit_identical_to_dispatch(tiny_model, monkeypatch, family, dtype):
    model = tiny_model(family, **WIDE)
    calls: list = []
    direct, stats = _run(model, dtype, 1, monkeypatch, True, calls)
    spec = load_spec(model)
    moe_layers = len(spec.moe_layer_ids)
    assert calls and len(calls) % moe_layers == 0      # every MoE layer of every step (Qwen2-MoE: with its shared expert)
    plain_calls: list = []
    plain, plain_stats = _run(model, dtype, 1, monkeypatch, False, plain_calls)
    assert not plain_calls
    assert [c.token_ids for c in direct] == [c.token_ids for c in plain]
    for a, b in zip(direct, plain):
        assert torch.equal(torch.tensor(a.logits), torch.tensor(b.logits))
    for key in ("micro_batches", "tokens", "empty_messages", "expert_gemms", "expert_reads"):
        assert stats[key] == plain_stats[key], key


def test_two_expert_ranks_keep_the_dispatch_path(tiny_model, monkeypatch):
    model = tiny_model("mixtral", **WIDE)
    calls: list = []
    two, _ = _run(model, "float32", 2, monkeypatch, True, calls)
    assert not calls
    one, _ = _run(model, "float32", 1, monkeypatch, True, calls)
    assert calls
    assert [c.token_ids for c in two] == [c.token_ids for c in one]
