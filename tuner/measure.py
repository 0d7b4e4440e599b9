"""Run one deployment shape for real and measure its decode steps (for timelines and accuracy checks).

B requests with prompts of `ctx` tokens are prefilled, decode for `warm_s` seconds untimed, then
`steps` decode steps are timed with tracing on (every request decoding in every step). The result holds the median step time, the
decode throughput B / step, and the spans of the step whose time is the median.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from cluster.deployment import Deployment
from scheduler.config import EngineConfig
from scheduler.engine import Engine
from scheduler.request import SamplingParams
from tuner.model_shape import ModelShape
from tuner.trace import quantile, spans_from_trace

WARM_STEPS_MAX = 100


@dataclass
class Measured:
    batch: int
    step_s: float                       # the q-quantile decode step (median by default), wall clock at the head
    step_times: list[float]
    ctx: float                          # mean context of the sequences over the timed steps
    spans: list = field(default_factory=list)
    events: list = field(default_factory=list)
    speed_s: float | None = None        # the machine's speed probe around the timed steps (tuner/speed.py)

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.step_s


def measure_decode(model_dir: str, n_a: int, n_e: int, m: int, batch: int, ctx: int, steps: int = 6,
                   dtype: str = "float32", progress=lambda msg: None, threads: int = 0, q: float = 0.5,
                   warm_s: float = 3.0, address: str | None = None, probe=None) -> Measured:
    """`probe`: a callable returning the machine's speed probe in seconds (`speed_probe`); when given, it runs
    right before and right after the timed steps (the ranks are idle then: the engine drives every step)
    and the mean is returned as `speed_s`."""
    shape = ModelShape.from_model_dir(model_dir)
    per_rank = -(-batch // n_a)
    config = EngineConfig(attention_ranks=n_a, expert_ranks=n_e, micro_batches=m, dtype=dtype, threads_per_rank=threads,
                          max_num_seqs=per_rank, max_batch_tokens=max(512, per_rank * ctx),
                          kv_cache_tokens=per_rank * (ctx + steps + WARM_STEPS_MAX + 8),
                          max_model_len=ctx + steps + WARM_STEPS_MAX + 8, schedule_ahead=0)
    progress(f"measuring A={n_a} E={n_e} m={m} B={batch} ctx={ctx}: starting the deployment")
    dep = Deployment.start(model_dir, config, address=address, progress=lambda msg: None)
    try:
        engine = Engine(config, dep.limits, dep, record_trace=True)
        params = SamplingParams(max_tokens=steps + WARM_STEPS_MAX + 2, ignore_eos=True)
        for i in range(batch):
            engine.add_request([(11 * i + 5 * n + 1) % shape.vocab_size for n in range(ctx)], params)
        running = lambda: [r for rank in engine.scheduler.running for r in rank]   # noqa: E731
        while len(running()) < batch or any(not r.output_token_ids for r in running()):
            engine.step()
        # Warm decode steps for at least warm_s: a freshly started Ray's own daemons take CPU for a
        # few seconds, and the first steps of fresh ranks are slower.
        t_warm = time.monotonic()
        for _ in range(WARM_STEPS_MAX):
            engine.step()
            if time.monotonic() - t_warm >= warm_s:
                break
        speed = [probe()] if probe else []
        t_start = time.time()
        engine.trace.clear()                             # keep the timed steps' spans only
        times, contexts = [], []
        for _ in range(steps):
            contexts.append(sum(r.num_tokens for r in running()) / max(1, len(running())))
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
        if probe:
            speed.append(probe())
        events = engine.trace + dep.expert_trace(since=t_start)
    finally:
        dep.shutdown()
    median = quantile(times, q)
    traced_steps = sorted({e.step for e in events if e.side == "attention"})
    pick = min(range(len(times)), key=lambda i: abs(times[i] - median))
    spans, _ = spans_from_trace(events, traced_steps[pick] if pick < len(traced_steps) else None)
    progress(f"measured {median * 1e3:.1f} ms per decode step ({batch / median:.1f} tokens/s)")
    return Measured(batch, median, times, sum(contexts) / len(contexts), spans, events,
                    sum(speed) / len(speed) if speed else None)
