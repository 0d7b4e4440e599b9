"""A colocated node with one expert rank: the attention rank calls the expert rank directly
(`AttentionEndpoint.inline_experts`) instead of dispatch + combine through the in-process backend,
a layer at a time (`ExpertRank.compute_rows`) or, where every layer fits, every layer of a decode
step in one kernel call (`DecodeLayers`, models/csrc/layer.cpp). All three must give the same tokens
and logits bit for bit, and the expert rank must count the same work each way; two expert ranks
keep the dispatch path."""

from __future__ import annotations

import pytest
import torch

import attention_node.forward as forward
import transfer.inprocess as inprocess
from cluster.colocated import ColocatedRanks, InProcessColocated
from models.spec import load_spec
from scheduler.config import EngineConfig, EngineLimits
from scheduler.engine import Engine
from scheduler.placement import Placement
from scheduler.request import SamplingParams

PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2], [7], [2, 7, 1, 8, 2, 8]]
WIDE = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2)
# Expert matrices of 2^16+ elements, so that they are panel-packed too (what the one-call step needs).
EXPERTS = {"mixtral": dict(intermediate_size=256), "qwen2_moe": dict(moe_intermediate_size=256)}


class _Counted:
    """The inline expert rank, counting which of its entry points the attention rank used."""

    def __init__(self, expert, calls: dict):
        self.expert, self.calls = expert, calls

    def compute_rows(self, *args):
        self.calls["rows"] += 1
        return self.expert.compute_rows(*args)

    def decode_kernel_args(self):
        return self.expert.decode_kernel_args()

    def record_decode(self, *args):
        self.calls["fused"] += 1
        return self.expert.record_decode(*args)


def _run(model: str, dtype: str, expert_ranks: int, monkeypatch, mode: str):
    """mode: "dispatch" (no inline expert offered), "rows" (one layer at a time), "fused" (as deployed)."""
    real = inprocess.InProcessAttention.inline_experts
    calls = {"rows": 0, "fused": 0}
    monkeypatch.setattr(inprocess.InProcessAttention, "inline_experts",
                        lambda self: None if mode == "dispatch" or real(self) is None else _Counted(real(self), calls))
    if mode == "rows":
        monkeypatch.setattr(forward.AttentionForward, "_decode_layers", lambda self, kernels, experts: None)
    spec = load_spec(model)
    config = EngineConfig(dtype=dtype, max_batch_tokens=16, colocate=True, expert_ranks=expert_ranks)
    limits = EngineLimits.derive(config, max_position_embeddings=spec.max_position_embeddings,
                                 vocab_size=spec.vocab_size, eos_token_ids=spec.eos_token_ids)
    placement = Placement.contiguous(spec.num_experts, expert_ranks)
    ranks = ColocatedRanks(spec, config, limits, model, "cpu", None,
                           [placement.experts_of(e) for e in range(expert_ranks)])
    engine = Engine(config, limits, InProcessColocated(ranks), return_logits=True)
    try:
        out = engine.generate(PROMPTS, SamplingParams(max_tokens=6))
        stats = ranks.check_health()
        events = ranks.trace_events()
    finally:
        engine.shutdown()
    monkeypatch.undo()
    return out, stats, events, calls


@pytest.mark.parametrize("family,dtype", [("mixtral", "float32"), ("mixtral", "bfloat16"), ("qwen2_moe", "float32")])
def test_direct_expert_calls_are_bit_identical_to_dispatch(tiny_model, monkeypatch, family, dtype):
    model = tiny_model(family, **WIDE, **EXPERTS[family])
    runs = {mode: _run(model, dtype, 1, monkeypatch, mode) for mode in ("dispatch", "rows", "fused")}
    assert runs["dispatch"][3] == {"rows": 0, "fused": 0}
    assert runs["rows"][3]["rows"] > 0 and runs["rows"][3]["fused"] == 0
    if family == "mixtral":      # every layer fits the one-call step: decode steps take it
        assert runs["fused"][3]["fused"] > 0
    else:                        # Qwen2-MoE's shared expert is not in it: a layer at a time
        assert runs["fused"][3]["fused"] == 0 and runs["fused"][3]["rows"] > 0
    plain, plain_stats, plain_events, _ = runs["dispatch"]
    for mode in ("rows", "fused"):
        out, stats, events, _ = runs[mode]
        assert [c.token_ids for c in out] == [c.token_ids for c in plain], mode
        for a, b in zip(out, plain):
            assert torch.equal(torch.tensor(a.logits), torch.tensor(b.logits)), mode
        for key in ("micro_batches", "tokens", "empty_messages", "expert_gemms", "expert_reads"):
            assert stats[key] == plain_stats[key], (mode, key)
        # one expert span per (step, layer, micro-batch), with its token count, as the dispatch path traces them
        assert sorted((e.step, e.layer, e.micro_batch, e.tokens) for e in events) == \
            sorted((e.step, e.layer, e.micro_batch, e.tokens) for e in plain_events), mode
        assert all(e.end >= e.start for e in events)


def test_two_expert_ranks_keep_the_dispatch_path(tiny_model, monkeypatch):
    model = tiny_model("mixtral", **WIDE, **EXPERTS["mixtral"])
    two, _, _, calls = _run(model, "float32", 2, monkeypatch, "fused")
    assert calls == {"rows": 0, "fused": 0}
    one, _, _, calls = _run(model, "float32", 1, monkeypatch, "fused")
    assert calls["fused"] > 0
    assert [c.token_ids for c in two] == [c.token_ids for c in one]
