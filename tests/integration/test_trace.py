"""Timelines: a traced step records every (layer, micro-batch) span on both sides, in causal order."""

import time

from cluster.deployment import Deployment
from scheduler.config import EngineConfig
from scheduler.engine import Engine
from scheduler.request import SamplingParams

SLACK_S = 0.005   # two processes stamp their own clocks around one message


def test_traced_steps_record_attention_and_expert_spans(ray_session, tiny_model):
    config = EngineConfig(attention_ranks=1, expert_ranks=2, micro_batches=2)
    dep = Deployment.start(tiny_model("qwen3_moe"), config)
    try:
        engine = Engine(config, dep.limits, dep, record_trace=True)
        t0 = time.time()
        engine.generate([[1, 2, 3], [4, 5, 6, 7]], SamplingParams(max_tokens=3))
        experts = dep.expert_trace(since=t0)
    finally:
        dep.shutdown()
    attn = {(e.step, e.layer, e.micro_batch, e.phase): e for e in engine.trace}
    steps = sorted({e.step for e in engine.trace})
    assert len(steps) == 3
    moe_layers = range(3)
    for step in steps:
        assert (step, -1, -1, "lm_head") in attn
        for layer in moe_layers:
            for mb in (0, 1):
                sent, waited = attn[(step, layer, mb, "attention")], attn[(step, layer, mb, "wait")]
                assert sent.end <= waited.start + SLACK_S
                done = [e for e in experts if (e.step, e.layer, e.micro_batch) == (step, layer, mb)]
                assert {e.rank for e in done} == {0, 1}          # both expert ranks saw this micro-batch
                for e in done:
                    assert e.start >= sent.end - SLACK_S           # the experts start after the dispatch
                    if e.tokens:   # a rank that got no token sends no combine, so nothing waits for it
                        assert waited.end >= e.end - SLACK_S       # the combine ends after the experts
