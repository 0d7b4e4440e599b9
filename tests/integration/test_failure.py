"""A dead expert rank never hangs the server: the attention side fails clearly, within the timeout."""

import os
import signal
import time

import psutil
import pytest

from cluster.deployment import Deployment, DeploymentError
from scheduler.config import EngineConfig
from scheduler.engine import Engine
from scheduler.request import SamplingParams
from processes import still_running

TIMEOUT_S = 5.0          # transfer_timeout_s: the deadline of every wait on a peer
STEP_TIMEOUT_S = 120.0   # the head's own deadline for a whole step, which a dead peer must never come to
# Between the kill and the error: at most one transfer deadline, plus the ranks finishing the step that
# was in flight and Ray carrying the error to the head, on a machine that other jobs may keep busy.
SLACK_S = 30.0
# Deployment.shutdown's own deadlines: 30 s for the attention ranks' shutdown and 30 s for the expert
# loops to end, after which it kills the ranks anyway. A shutdown past both (with slack) hangs.
SHUTDOWN_BOUND_S = 30 + 30 + SLACK_S
GONE_WITHIN_S = 60.0     # for Ray to take down the rank processes it was told to kill


def test_killed_expert_rank_fails_the_step_with_a_clear_error(ray_session, tiny_model):
    config = EngineConfig(attention_ranks=1, expert_ranks=2, micro_batches=2, transfer_timeout_s=TIMEOUT_S,
                          step_timeout_s=STEP_TIMEOUT_S)
    dep = Deployment.start(tiny_model("mixtral"), config)
    try:
        engine = Engine(config, dep.limits, dep)
        for i in range(4):
            engine.add_request([1 + i, 2, 3, 4], SamplingParams(max_tokens=64))
        for _ in range(3):                        # mid-generation: prefill done, decoding
            assert engine.step()
        health = dep.health()                     # attention rank 0, expert ranks 0 and 1
        ranks = [psutil.Process(h["pid"]) for h in health]    # this deployment's rank processes
        victim = health[2]
        assert victim["experts"] == [4, 5, 6, 7]
        # The kill may land while a step is in flight on the ranks (the engine schedules one ahead) or
        # between steps, and either the victim's dropped connection or a transfer deadline may end the
        # step: in every case the next step that needs the victim fails, naming it.
        os.kill(victim["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(DeploymentError) as err:
            for _ in range(100):                  # far fewer steps than the requests' 64 tokens need
                engine.step()
        elapsed = time.monotonic() - t0
        msg = str(err.value)
        print(f"failed after {elapsed:.2f}s: {msg}")
        assert "failed on attention rank 0" in msg, msg          # the rank that reported it ...
        assert "expert rank 1" in msg, msg                       # ... the dead rank it waited on ...
        assert "layer" in msg and "micro-batch" in msg, msg      # ... and where
        assert elapsed < TIMEOUT_S + SLACK_S < STEP_TIMEOUT_S, f"the step failed after {elapsed:.1f}s: {msg}"
    finally:
        t0 = time.monotonic()
        dep.shutdown()                            # must not hang on the dead peer either
        shutdown_s = time.monotonic() - t0
    assert shutdown_s < SHUTDOWN_BOUND_S, f"shutdown took {shutdown_s:.1f}s"
    alive = still_running(ranks, GONE_WITHIN_S)
    assert not alive, f"rank processes still running {GONE_WITHIN_S:g}s after shutdown: {alive}"


