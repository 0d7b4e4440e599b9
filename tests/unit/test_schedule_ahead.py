"""The head schedules step N+1 before it has step N's tokens (EngineConfig.schedule_ahead = 1).

The ranks feed PENDING_TOKEN with the token they sampled; the outputs must be exactly those of a
head that waits for every step (schedule_ahead = 0): same tokens, same finish reasons, through EOS,
stop tokens, length limits, preemption and aborts. What lookahead costs is bounded: a request that
stops on a token the head had not seen yet has one more token computed, never more.
"""

from scheduler.messages import PENDING_TOKEN
from scheduler.request import FinishReason, SamplingParams
from serving_fakes import FakeRanks, expected_tokens, fake_engine

PROMPTS = [[5, 9, 2], [7] * 11, [3, 1], [8, 8, 8, 8, 8, 8], [4] * 17, [6, 2, 9, 9]]


class CountingRanks(FakeRanks):
    """FakeRanks that count, per request, the sampled chunks they ran and the PENDING_TOKENs they fed."""

    def __init__(self):
        super().__init__()
        self.samples: dict[str, int] = {}
        self.pending_fed = 0
        self.multi_step = 0          # plans that ran more than one decode step

    def run_step(self, plans):
        for plan in plans:
            self.multi_step += plan.decode_steps > 1
            for c in (c for mb in plan.micro_batches for c in mb):
                self.pending_fed += c.token_ids[-1] == PENDING_TOKEN
                if c.sample:
                    self.samples[c.request_id] = self.samples.get(c.request_id, 0) + plan.decode_steps
        return super().run_step(plans)


def generate(ahead: int, eos=(), blocks=64, params=None, **cfg):
    eng = fake_engine(eos=eos, blocks=blocks, schedule_ahead=ahead, **cfg)
    eng.ranks = CountingRanks()
    params = params or [SamplingParams(max_tokens=12 + i) for i in range(len(PROMPTS))]
    out = eng.generate(PROMPTS, params)
    return out, eng


def test_scheduling_ahead_feeds_the_rank_its_own_token_and_stops_at_the_length():
    eng = fake_engine(schedule_ahead=1, attention_ranks=1)
    s = eng.scheduler
    s.add("a", [5, 6, 7], SamplingParams(max_tokens=3))
    first = s.schedule()
    ahead = s.schedule()                       # before step 1's token is known
    (chunk,) = ahead[0].micro_batches[0]
    assert (chunk.token_ids, chunk.start_pos, chunk.sample, chunk.output_index) == ([PENDING_TOKEN], 3, True, 1)
    ranks = eng.ranks
    outs = s.update(ranks.run_step(first))
    assert [o.new_token_ids for o in outs] == [expected_tokens([5, 6, 7], 1)]
    third = s.schedule()
    assert third[0].micro_batches[0][0].output_index == 2
    assert s.schedule() is None                # the token in flight is the third and last: nothing more to run
    s.update(ranks.run_step(ahead))
    outs = s.update(ranks.run_step(third))
    assert outs[0].finish_reason is FinishReason.LENGTH
    assert not s.has_work() and s.kv_usage()[0][0] == 0


def test_same_outputs_as_waiting_for_every_step():
    ref = [expected_tokens(p, 12 + i) for i, p in enumerate(PROMPTS)]
    eos = ref[1][4]                            # request 1 stops at its 5th token; others may too
    stop = ref[3][2]
    params = [SamplingParams(max_tokens=12 + i, stop_token_ids=(stop,) if i == 3 else ()) for i in range(len(PROMPTS))]
    params[5] = SamplingParams(max_tokens=17, ignore_eos=True)
    runs = {}
    for ahead in (0, 1):
        out, eng = generate(ahead, eos=(eos,), params=params, max_batch_tokens=8)
        runs[ahead] = ([(c.token_ids, c.finish_reason) for c in out], eng, [c.request_id for c in out])
        assert not eng.has_work() and all(used == 0 for used, _ in eng.scheduler.kv_usage())
    assert runs[0][0] == runs[1][0]
    tokens = {i: t for i, (t, _) in enumerate(runs[1][0])}
    assert tokens[1] == ref[1][:5] and runs[1][0][1][1] is FinishReason.EOS
    assert runs[1][0][3][1] is FinishReason.STOP and tokens[3][-1] == stop
    assert tokens[5] == expected_tokens(PROMPTS[5], 17)
    with_ahead, without = runs[1][1].ranks, runs[0][1].ranks
    assert with_ahead.pending_fed > 0 and without.pending_fed == 0
    # The price: a request that stopped on a token the head had not seen ran at most one sample more.
    extra = [with_ahead.samples[ra] - without.samples[r0] for ra, r0 in zip(runs[1][2], runs[0][2])]
    assert set(extra) <= {0, 1} and extra[1] == 1 and extra[5] == 0


def test_preemption_while_a_step_is_ahead_gives_the_same_tokens(monkeypatch):
    # 12 blocks of 4 slots cannot hold all six requests to the end: the newest are preempted and recomputed.
    from scheduler.scheduler import Scheduler
    preempted = []
    real = Scheduler._preempt
    monkeypatch.setattr(Scheduler, "_preempt", lambda self, req: (preempted.append(req.request_id), real(self, req)))
    outs = {}
    for ahead in (0, 1):
        out, eng = generate(ahead, blocks=12, max_batch_tokens=16, attention_ranks=1, max_num_seqs=6)
        outs[ahead] = [c.token_ids for c in out]
    assert outs[0] == outs[1] == [expected_tokens(p, 12 + i) for i, p in enumerate(PROMPTS)]
    assert preempted


def test_abort_lands_while_a_step_is_ahead():
    eng = fake_engine(schedule_ahead=1, attention_ranks=1)
    a = eng.add_request([1, 2, 3], SamplingParams(max_tokens=50))
    b = eng.add_request([4, 5], SamplingParams(max_tokens=4))
    eng.step()
    eng.step()
    assert eng.abort(a).finish_reason is FinishReason.CANCELLED
    tokens = []
    while eng.has_work():
        for o in eng.step():
            assert o.request_id == b, "no token of an aborted request is delivered"
            tokens += o.new_token_ids
    got = 2 + len(tokens)  # b got a token in each of the first two steps
    assert got == 4 and eng.scheduler.kv_usage()[0][0] == 0


def test_several_decode_steps_per_call_give_the_same_outputs():
    """decode_steps > 1: once every running request decodes and none waits, one call runs several
    steps, the ranks feeding back their own tokens; tokens, finish reasons (EOS, stop token, length),
    the KV blocks returned, all as one step per call, with and without scheduling ahead. The price is
    bounded: a request that stops on EOS or a stop token ran at most decode_steps - 1 samples more
    (with scheduling ahead, the call in flight behind it too: 2 · decode_steps - 1), never past its
    length limit."""
    ref = [expected_tokens(p, 12 + i) for i, p in enumerate(PROMPTS)]
    eos = ref[1][4]
    stop = ref[3][2]
    params = [SamplingParams(max_tokens=12 + i, stop_token_ids=(stop,) if i == 3 else ()) for i in range(len(PROMPTS))]
    params[5] = SamplingParams(max_tokens=17, ignore_eos=True)
    base, base_eng = generate(0, eos=(eos,), params=params, max_batch_tokens=8)
    want = [(c.token_ids, c.finish_reason) for c in base]
    for ahead in (0, 1):
        for steps in (2, 4, 8):
            out, eng = generate(ahead, eos=(eos,), params=params, max_batch_tokens=8, decode_steps=steps)
            assert [(c.token_ids, c.finish_reason) for c in out] == want, f"ahead {ahead}, {steps} steps"
            assert eng.ranks.multi_step > 0
            assert not eng.has_work() and all(used == 0 for used, _ in eng.scheduler.kv_usage())
            extra = [eng.ranks.samples[a.request_id] - base_eng.ranks.samples[b.request_id] for a, b in zip(out, base)]
            assert all(0 <= e <= steps - 1 + ahead * steps for e in extra), extra
            assert extra[5] == 0          # a length limit is known in advance: nothing past it


def test_decode_steps_wait_for_prefills_and_admissions():
    """A plan runs several decode steps only when every chunk is a decode token and nobody waits."""
    eng = fake_engine(schedule_ahead=0, attention_ranks=1, decode_steps=4, max_batch_tokens=64)
    s = eng.scheduler
    s.add("a", [5, 6, 7], SamplingParams(max_tokens=10))
    first = s.schedule()                           # a prefill
    assert first[0].decode_steps == 1
    s.update(eng.ranks.run_step(first))
    s.add("b", [1, 2], SamplingParams(max_tokens=3))
    second = s.schedule()                          # a decode, and b's prefill: one step
    assert second[0].decode_steps == 1
    s.update(eng.ranks.run_step(second))
    third = s.schedule()                           # both decode, nobody waits: up to b's length limit
    assert third[0].decode_steps == 2
    outs = s.update(eng.ranks.run_step(third))
    assert [o.request_id for o in outs] == ["a", "b", "a", "b"] and outs[-1].finish_reason is FinishReason.LENGTH
    fourth = s.schedule()
    assert fourth[0].decode_steps == 4 and len(fourth[0].micro_batches[0]) == 1
