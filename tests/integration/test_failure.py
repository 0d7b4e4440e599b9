"""A dead expert rank never hangs the server: the attention side fails clearly, within the timeout."""

import os
import signal
import time

import pytest
import ray

from cluster.deployment import Deployment, DeploymentError
from scheduler.config import EngineConfig
from scheduler.engine import Engine
from scheduler.request import SamplingParams

TIMEOUT_S = 5.0


def test_killed_expert_rank_fails_the_step_with_a_clear_error(ray_session, tiny_model):
    config = EngineConfig(attention_ranks=1, expert_ranks=2, micro_batches=2, transfer_timeout_s=TIMEOUT_S)
    dep = Deployment.start(tiny_model("mixtral"), config)
    try:
        engine = Engine(config, dep.limits, dep)
        for i in range(4):
            engine.add_request([1 + i, 2, 3, 4], SamplingParams(max_tokens=64))
        for _ in range(3):                        # mid-generation: prefill done, decoding
            assert engine.step()
        victim = dep.health()[2]                  # attention rank 0, expert ranks 0 and 1
        assert victim["experts"] == [4, 5, 6, 7]
        os.kill(victim["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(DeploymentError) as err:
            for _ in range(100):
                engine.step()
        elapsed = time.monotonic() - t0
        msg = str(err.value)
        print(f"failed after {elapsed:.2f}s: {msg}")
        assert elapsed < TIMEOUT_S + 3, f"took {elapsed:.1f}s"
        assert "attention rank 0" in msg and "expert rank 1" in msg and "layer" in msg and "micro-batch" in msg, msg
    finally:
        t0 = time.monotonic()
        dep.shutdown()                            # must not hang on the dead peer either
        assert time.monotonic() - t0 < 60
    alive = [a for a in dep.attention + dep.experts if _alive(a)]
    assert not alive


def _alive(actor) -> bool:
    try:
        ray.get(actor.check_health.remote(), timeout=5)
        return True
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False
