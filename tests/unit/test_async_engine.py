"""AsyncEngine: the Engine on a thread, fed and drained from asyncio (fake ranks, no Ray)."""

import asyncio

import pytest

from serving.async_engine import AsyncEngine
from serving.streams import ENGINE_FAILED, EngineStopped
from scheduler.request import FinishReason, InvalidRequest, SamplingParams
from scheduler.scheduler import QueueFull
from serving_fakes import expected_tokens, fake_engine


def run(coro_fn, engine, timeout=20, on_failure=None):
    async def main():
        ae = AsyncEngine(engine, on_failure=on_failure)
        ae.start()
        try:
            return await asyncio.wait_for(coro_fn(ae), timeout)
        finally:
            await asyncio.get_running_loop().run_in_executor(None, ae.shutdown)
    return asyncio.run(main())


async def collect(stream):
    tokens, reason = [], None
    async for out in stream:
        tokens += out.new_token_ids
        reason = out.finish_reason
    return tokens, reason


def test_concurrent_requests_get_their_own_tokens():
    prompts = [[i + 1, i + 2, i + 3][: 1 + i % 3] for i in range(20)]

    async def go(ae):
        streams = [await ae.submit(p, SamplingParams(max_tokens=5 + i % 4), f"r{i}") for i, p in enumerate(prompts)]
        return await asyncio.gather(*(collect(s) for s in streams)), streams

    results, streams = run(go, fake_engine())
    for i, (p, (tokens, reason)) in enumerate(zip(prompts, results)):
        assert tokens == expected_tokens(p, 5 + i % 4)
        assert reason is FinishReason.LENGTH
    s = streams[0]
    assert s.arrival <= s.scheduled_at <= s.first_token_at <= s.last_token_at and s.tokens == 5


def test_abort_frees_kv_blocks_before_the_next_step():
    async def go(ae):
        stream = await ae.submit([1, 2, 3], SamplingParams(max_tokens=200), "long")
        await stream.__anext__()  # running and holding blocks
        assert sum(u for u, _ in ae.status().kv_usage) > 0
        ae.abort("long")
        tokens, reason = await collect(stream)
        await asyncio.sleep(0.05)
        return reason, ae.status()

    reason, status = run(go, fake_engine(step_s=0.01))
    assert reason is FinishReason.CANCELLED
    assert all(used == 0 for used, _ in status.kv_usage) and status.running == 0


def test_invalid_request_and_full_queue_are_refused_without_hurting_others():
    async def go(ae):
        with pytest.raises(InvalidRequest) as e:
            await ae.submit([999999], SamplingParams(), "bad")
        assert e.value.field == "token_ids"
        running = [await ae.submit([1], SamplingParams(max_tokens=30), f"r{i}") for i in range(2)]
        waiting = await ae.submit([1], SamplingParams(max_tokens=3), "w")
        with pytest.raises(QueueFull):
            await ae.submit([1], SamplingParams(max_tokens=3), "refused")
        with pytest.raises(InvalidRequest):
            await ae.submit([1], SamplingParams(), "w")  # duplicate id in flight
        return [await collect(s) for s in running + [waiting]]

    done = run(go, fake_engine(step_s=0.005, attention_ranks=1, max_num_seqs=2, max_queue=1))
    assert [len(t) for t, _ in done] == [30, 30, 3]


def test_engine_failure_fails_every_request_and_later_submits(caplog):
    failures = []

    async def go(ae):
        streams = [await ae.submit([i + 1], SamplingParams(max_tokens=50), f"r{i}") for i in range(4)]
        for s in streams:
            with pytest.raises(EngineStopped) as e:
                await collect(s)
            assert str(e.value) == ENGINE_FAILED     # the cause is in the log, not in what clients see
        with pytest.raises(EngineStopped, match=ENGINE_FAILED):
            await ae.submit([1], SamplingParams(), "late")
        return ae.status()

    status = run(go, fake_engine(step_s=0.01, fail_at_step=10), on_failure=failures.append)
    assert status.error == ENGINE_FAILED and failures == [ENGINE_FAILED] and status.faults == ()
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1 and "injected" in str(logged[0].exc_info[1])   # the details, once


def test_shutdown_stops_the_ranks_and_is_not_a_failure():
    engine = fake_engine(step_s=0.02)      # 200 tokens take 4 s: the shutdown lands while the request runs
    failures = []

    async def go(ae):
        stream = await ae.submit([1], SamplingParams(max_tokens=200), "cut")
        await stream.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, ae.shutdown)
        with pytest.raises(EngineStopped, match="shut down"):
            await collect(stream)      # the request in flight is told why it ended

    run(go, engine, on_failure=failures.append)
    assert engine.ranks.shut.is_set() and failures == []
