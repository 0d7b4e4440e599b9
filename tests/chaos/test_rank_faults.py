"""Chaos: a rank of either kind is killed (SIGKILL) or stopped (SIGSTOP) mid-generation with 16
requests in flight; the deployment replaces its ranks and every request completes with exactly the
tokens of a fault-free run (greedy), recomputed from its prompt plus the tokens it already had.

One deployment takes every fault in turn (each recovery gives it a new set of ranks), so the four
faults cost one start-up. Detection here is the data plane's own: a dead peer's socket closes at
once; a stopped one misses the transfer deadline (attention side) or the step deadline (expert side
waiting on a stopped attention rank), both set short. Times are printed, not asserted.
"""

import os
import signal
import threading
import time

import pytest

from cluster.deployment import Deployment
from scheduler.config import EngineConfig
from scheduler.engine import Engine
from scheduler.request import FinishReason, SamplingParams

PROMPTS = [[1 + i, 2 + i % 5, 3, 4 + i % 7] for i in range(16)]
NEW_TOKENS = 24
FAULTS = [("expert", signal.SIGKILL), ("expert", signal.SIGSTOP), ("attention", signal.SIGKILL),
          ("attention", signal.SIGSTOP)]


@pytest.fixture(scope="module")
def deployment(ray_session, tiny_model):
    config = EngineConfig(attention_ranks=1, expert_ranks=2, micro_batches=2, max_batch_tokens=32,
                          transfer_timeout_s=3.0, step_timeout_s=8.0, max_recoveries=2)
    dep = Deployment.start(tiny_model("mixtral"), config)
    yield dep
    dep.shutdown()


def _generate(dep, fault=None):
    """Greedy tokens of every prompt; with `fault` (side, signal), the signal hits that side's rank 0
    once the engine is 4 steps in (prefill done, decoding)."""
    engine = Engine(dep.config, dep.limits, dep)
    stopped, report = [], {}
    if fault is not None:
        side, sig = fault
        health = dep.health()
        victim = health[0] if side == "attention" else health[dep.config.attention_ranks]

        def inject():
            while engine.scheduler.step_id < 4:
                time.sleep(0.005)
            os.kill(victim["pid"], sig)
            report["at"] = time.monotonic()
            if sig == signal.SIGSTOP:
                stopped.append(victim["pid"])
        threading.Thread(target=inject, daemon=True).start()
    try:
        out = engine.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    finally:
        for pid in stopped:          # a stopped rank was replaced (killed); never leave one frozen
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    report["done"] = time.monotonic()
    return out, report


def test_every_stream_survives_each_fault_with_fault_free_tokens(deployment):
    reference, _ = _generate(deployment)
    assert all(c.finish_reason is FinishReason.LENGTH for c in reference)
    for n, fault in enumerate(FAULTS, start=1):
        t_recoveries = list(deployment.recovery_seconds)
        out, report = _generate(deployment, fault)
        assert deployment.recoveries == n, f"{fault}: the fault was not noticed"
        assert [c.token_ids for c in out] == [c.token_ids for c in reference], f"{fault}: tokens differ"
        assert all(c.finish_reason is FinishReason.LENGTH for c in out)
        recovery = deployment.recovery_seconds[len(t_recoveries)]
        print(f"{fault[0]} rank {signal.Signals(fault[1]).name}: generation done {report['done'] - report['at']:.1f}s "
              f"after the fault; replacing the ranks took {recovery:.1f}s")
