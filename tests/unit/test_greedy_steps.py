"""A colocated node's greedy decode steps in one kernel call (`DecodeLayers.greedy_steps`, through
`AttentionRank._greedy_steps`): every layer, the final norm, the LM head and the greedy pick of each
step, and the next step's inputs, without Python between steps. It must give the tokens the per-step
passes give, bit for bit, with the expert rank counting and tracing the same work; a request that
samples or asks for logprobs keeps the passes; a step whose logits have no finite maximum goes
through the sampler's rule (the greedy fallback), as a pass would."""

from __future__ import annotations

import pytest
import torch

import attention_node.forward as forward
from cluster.colocated import ColocatedRanks, InProcessColocated
from models.spec import load_spec
from scheduler.config import EngineConfig, EngineLimits
from scheduler.engine import Engine
from scheduler.placement import Placement
from scheduler.request import SamplingParams

PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2], [7], [2, 7, 1, 8, 2, 8]]
# Panel-packed experts (2^16+ elements each), as the one-call step needs; a vocabulary large enough for the
# LM head's int8 screen to decide (it gives up when more than an eighth of the rows are left).
MODEL = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=256,
             vocab_size=2048)


def _kernels_or_skip(dtype: str) -> None:
    from models.cpu_kernels import cpu_kernels
    ext = cpu_kernels()
    if ext is None or not ext.has_panel_linear() or (dtype == "bfloat16" and not ext.has_bf16_panels()):
        pytest.skip(f"no panel-packed {dtype} weights on this CPU: the one-call steps do not apply")


def _screened() -> bool:
    from models.cpu_kernels import cpu_kernels
    return cpu_kernels().has_head_screen()


def _run(model: str, dtype: str, decode_steps: int, monkeypatch, loop: bool, params=None, poison=None, screen=True):
    """loop: whether the one-call greedy steps may run (False: every step a pass). poison: "norm" (the
    final norm's weight NaN: every logit NaN) or a token id (its embedding row NaN: the rows fed it,
    and those sequences from then on, get NaN logits)."""
    real = forward.AttentionForward.greedy_steps
    steps_in_loop = []

    def counted(self, *args):
        got = real(self, *args) if loop else None
        if got is not None:
            steps_in_loop.append((len(got[0]), got[1] is not None))
        return got
    monkeypatch.setattr(forward.AttentionForward, "greedy_steps", counted)
    spec = load_spec(model)
    config = EngineConfig(dtype=dtype, max_batch_tokens=16, colocate=True, decode_steps=decode_steps)
    limits = EngineLimits.derive(config, max_position_embeddings=spec.max_position_embeddings,
                                 vocab_size=spec.vocab_size, eos_token_ids=spec.eos_token_ids)
    placement = Placement.contiguous(spec.num_experts, 1)
    ranks = ColocatedRanks(spec, config, limits, model, "cpu", None, [placement.experts_of(0)])
    if not screen:
        ranks.worker.forward.w.lm_screen = None
    if poison == "norm":
        ranks.worker.forward.w.final_norm.fill_(float("nan"))
    elif poison is not None:
        ranks.worker.forward.w.embed[poison].fill_(float("nan"))
    engine = Engine(config, limits, InProcessColocated(ranks))
    try:
        out = engine.generate(PROMPTS, params or SamplingParams(max_tokens=9))
        stats = ranks.check_health()
        events = ranks.trace_events()
        picks = ranks.worker.forward.head_picks.copy()       # a Counter: a kind never seen counts 0
    finally:
        engine.shutdown()
    monkeypatch.undo()
    return [c.token_ids for c in out], stats, events, steps_in_loop, picks


@pytest.mark.parametrize("dtype,decode_steps", [("float32", 1), ("float32", 4), ("bfloat16", 4)])
def test_greedy_steps_in_one_call_give_the_passes_tokens(tiny_model, monkeypatch, dtype, decode_steps):
    _kernels_or_skip(dtype)
    model = tiny_model("mixtral", **MODEL)
    tokens, stats, events, _, _ = _run(model, dtype, decode_steps, monkeypatch, loop=False)
    got, got_stats, got_events, loops, picks = _run(model, dtype, decode_steps, monkeypatch, loop=True)
    assert loops and max(n for n, _ in loops) == decode_steps, "the one-call loop never ran, or not for the call's steps"
    assert sum(n for n, _ in loops) >= 4 and not any(stop for _, stop in loops), loops
    assert got == tokens
    if _screened():          # the LM head's int8 screen picked (the same tokens) at most of the steps
        assert picks["screened"] > picks["whole_head"], picks
    for key in ("micro_batches", "tokens", "empty_messages", "expert_gemms", "expert_reads"):
        assert got_stats[key] == stats[key], key
    assert sorted((e.step, e.layer, e.micro_batch, e.tokens) for e in got_events) == \
        sorted((e.step, e.layer, e.micro_batch, e.tokens) for e in events)


def test_sampling_or_logprobs_keep_the_passes(tiny_model, monkeypatch):
    _kernels_or_skip("float32")
    model = tiny_model("mixtral", **MODEL)
    for params in (SamplingParams(max_tokens=6, temperature=0.8, seed=7), SamplingParams(max_tokens=6, logprobs=True)):
        tokens, _, _, _, _ = _run(model, "float32", 4, monkeypatch, loop=False, params=params)
        got, _, _, loops, picks = _run(model, "float32", 4, monkeypatch, loop=True, params=params)
        assert loops == [] and got == tokens, params


def test_logits_without_a_finite_maximum_take_the_samplers_fallback(tiny_model, monkeypatch):
    _kernels_or_skip("float32")
    model = tiny_model("mixtral", **MODEL)
    tokens, _, _, _, _ = _run(model, "float32", 4, monkeypatch, loop=False, poison="norm")
    got, _, _, loops, picks = _run(model, "float32", 4, monkeypatch, loop=True, poison="norm")
    assert loops and all(call == (0, True) for call in loops), loops     # every call stops at its first step
    assert got == tokens
    assert picks["screened"] == 0 and picks["whole_head"] >= len(loops)   # NaN x: the screen gives up, the head decides
    assert torch.tensor(got).eq(0).all()                   # the fallback's pick for all-NaN logits


def test_a_stop_midway_through_a_call_goes_on_with_the_passes(tiny_model, monkeypatch):
    """One token's embedding made NaN: the call stops at the step that feeds it (not its first), that
    step goes through the sampler, and the call's later steps (passes) and calls carry on, the other
    sequences with real tokens, as step by step."""
    _kernels_or_skip("float32")
    model = tiny_model("mixtral", **MODEL)
    clean, _, _, _, _ = _run(model, "float32", 4, monkeypatch, loop=False)
    seen = {t for p in PROMPTS for t in p}
    # a token first produced at output index 2 (fed at the second step of the first decode call)
    poison = next(out[2] for out in clean if out[2] not in seen | {t for o in clean for t in o[:2]})
    tokens, _, _, _, _ = _run(model, "float32", 4, monkeypatch, loop=False, poison=poison)
    got, _, _, loops, picks = _run(model, "float32", 4, monkeypatch, loop=True, poison=poison)
    assert any(stop and n > 0 for n, stop in loops), loops    # a call stopped after picking in C++
    assert got == tokens
    if _screened():
        assert picks["screened"] > 0 and picks["whole_head"] > 0, picks
    assert any(out[3:] != [0] * len(out[3:]) for out in got)    # the other sequences went on for real


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_screened_steps_give_hugging_faces_tokens(tiny_model, monkeypatch, decode_steps):
    """The one-call steps with the LM head's int8 screen against transformers itself (float32): the
    greedy tokens are identical."""
    _kernels_or_skip("float32")
    from tiny_models import hf_generate
    model = tiny_model("mixtral", **MODEL)
    ref_tokens, _ = hf_generate(model, PROMPTS, 9)
    got, _, _, loops, picks = _run(model, "float32", decode_steps, monkeypatch, loop=True)
    assert loops and got == ref_tokens
    if _screened():
        assert picks["screened"] > 0, picks


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_passes_pick_through_the_screen_as_through_the_whole_head(tiny_model, monkeypatch, dtype):
    """The per-step passes (every deployment, not only a colocated node's one-call steps) pick a few
    greedy rows through the head's int8 screen (`AttentionForward.greedy_pick`): the tokens of the
    whole head's logits and the sampler."""
    _kernels_or_skip(dtype)
    if not _screened():
        pytest.skip("no LM head screen on this CPU")
    model = tiny_model("mixtral", **MODEL)
    whole, _, _, _, none = _run(model, dtype, 1, monkeypatch, loop=False, screen=False)
    got, _, _, _, picks = _run(model, dtype, 1, monkeypatch, loop=False)
    assert got == whole
    assert none["screened"] == 0 and picks["screened"] > picks["whole_head"], picks
