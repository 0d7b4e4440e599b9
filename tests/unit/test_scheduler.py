"""Scheduler policy with fake ranks: admission, chunked prefill, micro-batches, finish/stop, preemption."""

import pytest

from scheduler.config import EngineConfig, EngineLimits
from scheduler.engine import Engine, InProcessRanks
from scheduler.messages import SampledToken, StepResult
from scheduler.microbatch import chunk_work, split_micro_batches
from scheduler.messages import SeqChunk
from scheduler.request import FinishReason, InvalidRequest, SamplingParams
from scheduler.scheduler import QueueFull, Scheduler, validate_request

EOS = 2


def make(blocks=64, block_size=4, max_len=64, **cfg):
    config = EngineConfig(**{"block_size": block_size, **cfg})
    limits = EngineLimits(max_model_len=max_len, kv_blocks_per_rank=blocks, block_size=block_size,
                          vocab_size=100, eos_token_ids=(EOS,))
    return Scheduler(config, limits)


class EchoRanks(InProcessRanks):
    """Samples `next_token(request_id, output_index)` for each sampled chunk; records the plans."""

    def __init__(self, next_token=lambda rid, i: 10 + i):
        self.next_token = next_token
        self.plans = []

    def run_step(self, plans):
        self.plans.append(plans)
        return [StepResult(p.step, r, [SampledToken(c.request_id, self.next_token(c.request_id, c.output_index), -0.5)
                                       for mb in p.micro_batches for c in mb if c.sample])
                for r, p in enumerate(plans)]


def test_rejects_what_can_never_fit_and_bad_input():
    lim = make(blocks=4, block_size=4, max_len=64).limits
    with pytest.raises(InvalidRequest, match="can never fit") as e:
        validate_request(lim, list(range(10)), SamplingParams(max_tokens=10))   # 20 tokens > 16 slots
    assert e.value.field == "max_tokens"
    with pytest.raises(InvalidRequest, match="prompt: is empty"):
        validate_request(lim, [], SamplingParams())
    with pytest.raises(InvalidRequest, match="token_ids"):
        validate_request(lim, [1, 100], SamplingParams())
    with pytest.raises(InvalidRequest, match="stop_token_ids"):
        validate_request(lim, [1], SamplingParams(stop_token_ids=(100,)))
    with pytest.raises(InvalidRequest, match="context"):
        validate_request(make(max_len=8).limits, [1] * 8, SamplingParams(max_tokens=1))
    for bad, field in ((dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
                       (dict(temperature=float("inf")), "temperature"), (dict(top_p=0.0), "top_p"),
                       (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(max_tokens=0), "max_tokens"),
                       (dict(seed=-1), "seed")):
        with pytest.raises(InvalidRequest) as e:
            SamplingParams(**bad)
        assert e.value.field == field and str(e.value) == f"{field}: {e.value.reason}"


def test_waits_for_kv_then_admits():
    s = make(blocks=5, block_size=4, max_len=64)
    s.add("a", [1] * 10, SamplingParams(max_tokens=6))   # 3 blocks for its prompt, 4 at the end
    s.add("b", [1] * 10, SamplingParams(max_tokens=6))   # needs 3 blocks for its prompt, 2 are free: waits
    plans = s.schedule()
    assert [c.request_id for c in plans[0].micro_batches[0]] == ["a"]
    assert [r.request_id for r in s.waiting] == ["b"]
    ranks = EchoRanks()
    for _ in range(7):                                   # a finishes (6 tokens), then b gets in
        s.update(ranks.run_step(plans))
        plans = s.schedule()
    assert [c.request_id for c in plans[0].micro_batches[0]] == ["b"]


def test_chunked_prefill_respects_the_token_budget_and_mixes_decode():
    s = make(max_batch_tokens=8, micro_batches=1)
    ranks = EchoRanks()
    s.add("long", list(range(1, 21)), SamplingParams(max_tokens=3))
    plans = s.schedule()
    (chunk,) = plans[0].micro_batches[0]
    assert (chunk.start_pos, len(chunk.token_ids), chunk.sample) == (0, 8, False)
    s.update(ranks.run_step(plans))
    s.add("short", [5, 6], SamplingParams(max_tokens=3))
    plans = s.schedule()
    chunks = plans[0].micro_batches[0]
    assert [(c.request_id, c.start_pos, len(c.token_ids)) for c in chunks] == [("long", 8, 8)]
    s.update(ranks.run_step(plans))
    plans = s.schedule()     # the last 4 prompt tokens of "long" (sampled), then "short" fills the budget
    chunks = plans[0].micro_batches[0]
    assert [(c.request_id, c.start_pos, len(c.token_ids), c.sample) for c in chunks] == [
        ("long", 16, 4, True), ("short", 0, 2, True)]
    s.update(ranks.run_step(plans))
    plans = s.schedule()     # both decode now: one token each, the last sampled one
    assert [(c.request_id, c.token_ids, c.start_pos) for c in plans[0].micro_batches[0]] == [("long", [10], 20), ("short", [10], 2)]


def test_generate_runs_every_request_to_its_length_and_frees_kv():
    s = make(micro_batches=2)
    eng = Engine(s.config, s.limits, EchoRanks())
    eng.scheduler = s
    out = eng.generate([[1, 2], [3], [4, 5, 6]], [SamplingParams(max_tokens=n) for n in (5, 1, 3)])
    assert [(c.token_ids, c.finish_reason) for c in out] == [
        ([10, 11, 12, 13, 14], FinishReason.LENGTH), ([10], FinishReason.LENGTH), ([10, 11, 12], FinishReason.LENGTH)]
    assert s.kv_usage() == [(0, s.limits.kv_blocks_per_rank)] and not s.has_work()


def test_eos_stop_token_and_ignore_eos():
    s = make(micro_batches=1)
    s.add("eos", [1], SamplingParams(max_tokens=5))
    s.add("stop", [1], SamplingParams(max_tokens=5, stop_token_ids=(7,)))
    s.add("keep", [1], SamplingParams(max_tokens=2, ignore_eos=True))
    ranks = EchoRanks(lambda rid, i: {"eos": EOS, "stop": 7, "keep": EOS}[rid])
    outs = {o.request_id: o for o in s.update(ranks.run_step(s.schedule()))}
    assert outs["eos"].finish_reason is FinishReason.EOS and outs["stop"].finish_reason is FinishReason.STOP
    assert not outs["keep"].finished
    outs = {o.request_id: o for o in s.update(ranks.run_step(s.schedule()))}
    assert outs["keep"].finish_reason is FinishReason.LENGTH
    assert not s.has_work() and s.kv_usage()[0][0] == 0


def test_abort_frees_kv_and_drops_late_tokens():
    s = make()
    s.add("a", [1, 2, 3], SamplingParams(max_tokens=8))
    plans = s.schedule()
    assert s.kv_usage()[0][0] == 1
    assert s.abort("a").finish_reason is FinishReason.CANCELLED
    assert s.kv_usage()[0][0] == 0
    assert s.update(EchoRanks().run_step(plans)) == []     # the in-flight step's token is dropped
    assert s.schedule() is None


def test_queue_full():
    s = make(max_queue=2)
    s.add("a", [1], SamplingParams())
    s.add("b", [1], SamplingParams())
    with pytest.raises(QueueFull):
        s.add("c", [1], SamplingParams())


def test_preemption_recomputes_and_finishes():
    s = make(blocks=5, block_size=4, max_len=64, micro_batches=1)
    ranks = EchoRanks()
    s.add("a", [1] * 7, SamplingParams(max_tokens=9))    # 16 tokens → 4 blocks at the end
    s.add("b", [1] * 3, SamplingParams(max_tokens=9))    # 12 tokens → 3 blocks at the end
    done = {}
    for _ in range(40):
        plans = s.schedule()
        if plans is None:
            break
        for o in s.update(ranks.run_step(plans)):
            if o.finished:
                done[o.request_id] = o.finish_reason
    assert done == {"a": FinishReason.LENGTH, "b": FinishReason.LENGTH}
    # a preempted request is released on its rank and restarts from position 0
    starts = [(c.request_id, c.start_pos) for plans in ranks.plans for c in plans[0].micro_batches[0]]
    assert ("b", 0) in starts[2:], "b was preempted and recomputed from scratch"
    assert any("b" in p[0].released for p in ranks.plans)


def test_requests_balance_over_attention_ranks():
    s = make(attention_ranks=2, micro_batches=1)
    for i in range(6):
        s.add(f"r{i}", [1] * (4 + i), SamplingParams(max_tokens=2))
    plans = s.schedule()
    per_rank = [sum(len(c.token_ids) for mb in p.micro_batches for c in mb) for p in plans]
    assert len(plans) == 2 and all(per_rank) and abs(per_rank[0] - per_rank[1]) <= 9
    assert {n.request_id for p in plans for n in p.new_requests} == {f"r{i}" for i in range(6)}


def _chunk(rid, n, start=0):
    return SeqChunk(rid, [1] * n, start, [0] * ((start + n) // 4 + 1), True)


def test_micro_batch_split_is_balanced_exact_and_ordered():
    chunks = [_chunk("p", 30), _chunk("a", 1, 100), _chunk("b", 1, 200), _chunk("c", 1, 10), _chunk("q", 20)]
    mbs = split_micro_batches(chunks, 2)
    assert len(mbs) == 2 and sorted(c.request_id for mb in mbs for c in mb) == sorted("pabcq")
    loads = [sum(chunk_work(c) for c in mb) for mb in mbs]
    assert max(loads) - min(loads) <= max(chunk_work(c) for c in chunks)
    for mb in mbs:   # original order kept inside a micro-batch
        idx = [chunks.index(c) for c in mb]
        assert idx == sorted(idx)
    assert split_micro_batches([_chunk("x", 1)], 3)[1:] == [[], []]


def test_step_uses_fewer_micro_batches_when_there_are_few_requests():
    s = make(micro_batches=3)
    s.add("a", [1, 2], SamplingParams())
    assert len(s.schedule()[0].micro_batches) == 1
