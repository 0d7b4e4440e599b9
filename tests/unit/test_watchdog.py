"""The engine's watchdog: a rank that stops or dies is declared within fault_detect_s, not when a
transfer deadline passes; a step that is only slow is not a fault (fake ranks, no Ray)."""

import asyncio
import logging
import time

import pytest

from scheduler.engine import FaultyRank
from scheduler.request import SamplingParams
from serving.async_engine import AsyncEngine
from serving.streams import LOST_RANK, EngineStopped
from serving_fakes import fake_engine

DETECT_S = 0.4
SILENT_EXPERT = FaultyRank("expert", 0, FaultyRank.NOT_ANSWERING, "no answer to a health check within 0.2s")
DEAD_ATTENTION = FaultyRank("attention", 1, FaultyRank.DEAD, "The actor died unexpectedly (pid 4242, 10.1.2.3)")


def serve(engine, go, timeout=20):
    """Run `go(ae)` against an AsyncEngine over `engine`; returns (its result, failures heard, shutdown seconds)."""
    failures = []

    async def main():
        ae = AsyncEngine(engine, on_failure=failures.append)
        ae.start()
        try:
            return await asyncio.wait_for(go(ae), timeout)
        finally:
            t0 = time.monotonic()
            await asyncio.get_running_loop().run_in_executor(None, ae.shutdown)
            failures.append(("shutdown took", time.monotonic() - t0))
    result = asyncio.run(main())
    return result, failures[:-1], failures[-1][1]


async def drain(stream):
    tokens = 0
    async for out in stream:
        tokens += len(out.new_token_ids)
    return tokens


def test_a_stalled_step_is_declared_within_fault_detect_s(caplog):
    engine = fake_engine(step_s=0.01, hang_at_step=8, faults=[SILENT_EXPERT], fault_detect_s=DETECT_S,
                         max_recoveries=0)

    async def go(ae):
        streams = [await ae.submit([i + 1], SamplingParams(max_tokens=100), f"r{i}") for i in range(3)]
        for s in streams:
            with pytest.raises(EngineStopped) as e:
                await drain(s)
            assert str(e.value) == LOST_RANK
        failed_at = time.monotonic()
        with pytest.raises(EngineStopped, match=LOST_RANK):
            await ae.submit([1], SamplingParams(), "late")
        return failed_at - engine.ranks.hung_at, ae.status()

    (detected_s, status), failures, shutdown_s = serve(engine, go)
    print(f"declared {detected_s:.2f}s after the step hung (fault_detect_s {DETECT_S})")
    assert detected_s < 3 * DETECT_S          # the bound is DETECT_S; the slack is for a loaded machine
    assert status.faults == (SILENT_EXPERT,) and status.error == LOST_RANK and failures == [LOST_RANK]
    assert shutdown_s < 5                     # the hung step is not waited for
    faults = [r for r in caplog.records if "rank fault" in r.getMessage()]
    assert len(faults) == 1 and "expert rank 0 not answering" in faults[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info]     # the hung step's end is an echo, not news


def test_a_slow_step_whose_ranks_answer_is_not_a_fault():
    engine = fake_engine(step_s=2 * DETECT_S, fault_detect_s=DETECT_S, attention_ranks=1)

    async def go(ae):
        stream = await ae.submit([3], SamplingParams(max_tokens=3), "slow")
        return await drain(stream), ae.status()

    (tokens, status), failures, _ = serve(engine, go)
    assert tokens == 3 and status.error is None and failures == []
    assert engine.ranks.probes >= 2           # it did ask, every slow step


def test_a_failed_step_is_blamed_on_the_rank_the_probe_finds(caplog):
    caplog.set_level(logging.INFO)
    engine = fake_engine(step_s=0.01, fail_at_step=5, faults=[DEAD_ATTENTION], fault_detect_s=DETECT_S,
                         max_recoveries=0)

    async def go(ae):
        stream = await ae.submit([1], SamplingParams(max_tokens=100), "r")
        with pytest.raises(EngineStopped, match=LOST_RANK):
            await drain(stream)
        return ae.status()

    status, failures, _ = serve(engine, go)
    assert status.faults == (DEAD_ATTENTION,) and failures == [LOST_RANK]
    assert len([r for r in caplog.records if r.exc_info]) == 1          # the step's traceback, once
    assert any("attention rank 1 dead: The actor died" in r.getMessage() for r in caplog.records)


def test_an_idle_engine_is_not_probed():
    engine = fake_engine(faults=[SILENT_EXPERT], fault_detect_s=0.1, max_recoveries=0)

    async def go(ae):
        out = await drain(await ae.submit([2], SamplingParams(max_tokens=2), "quick"))
        await asyncio.sleep(0.5)
        return out, ae.status()

    (tokens, status), failures, _ = serve(engine, go)
    assert tokens == 2 and status.error is None and engine.ranks.probes == 0


@pytest.mark.parametrize("seconds", [0.0, -1.0, 61.0])
def test_fault_detect_s_is_positive_and_within_the_transfer_deadline(seconds):
    from scheduler.config import EngineConfig
    with pytest.raises(ValueError, match="fault_detect_s"):
        EngineConfig(fault_detect_s=seconds, transfer_timeout_s=60.0)
