"""`shuttle tune profile`: measure the stage times of a real deployment and fit the cost model.

For each thread count, one deployment (1 attention rank, 1 expert rank, m = 1, so the two sides take
turns and every span is measured alone) decodes batches of b sequences at a few context lengths
with tracing on; each traced step yields T_a, T_e, the LM head, the dispatch and combine transfer
gaps (see tuner/trace.py) and the step's overhead outside the ranks. A warm-up
configuration runs first and is discarded (the first steps of a fresh deployment are slower).
Then a few whole multi-rank deployments (`calibration`, default A,E,M,B = 1,2,1,8, 1,1,2,16, 2,1,1,8 and 1,2,2,16)
decode for real, traced; their spans and step times calibrate the simulator's interference terms:
what the turn-taking profile cannot see (ranks computing at once on shared cores, messages waiting
for a core). Without calibration runs a contention probe (speed.concurrent_slowdown) stands in.
Every measurement is bracketed by the machine's speed probe (tuner/speed.py), recorded in the
profile; `rescale_speed=True` also rescales every sample to the profile's median speed.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

from cluster.deployment import Deployment
from scheduler.config import EngineConfig
from scheduler.engine import Engine
from scheduler.request import SamplingParams
from tuner.costs import token_bytes
from tuner.measure import measure_decode
from tuner.model_shape import ModelShape
from tuner.profile import Profile
from tuner.speed import concurrent_slowdown, speed_probe
from tuner.trace import quantile, step_gaps


def machine_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def run_profile(model_dir: str, dtype: str = "float32", threads: list[int] | None = None,
                batches: tuple[int, ...] = (1, 4, 8, 16, 32, 64), contexts: tuple[int, ...] = (16, 128),
                steps: int = 6, progress=print, address: str | None = None, quantile: float = 0.5,
                calibration: tuple = ((1, 2, 1, 8), (1, 1, 2, 16), (2, 1, 1, 8), (1, 2, 2, 16)), calibration_ctx: int = 64,
                rescale_speed: bool = False) -> Profile:
    """`quantile` of the span durations and step times taken as each sample (0.5: medians; lower
    values filter other jobs' interference on a shared machine). `calibration`: (A, E, M, B)
    deployments run whole afterwards, to calibrate the interference terms (see profile.py).
    `rescale_speed`: put every sample on the reference speed of the machine's speed probe (off by default:
    the accuracy runs came out no better with it, docs/tuning.md; the probes are recorded either way)."""

    cores = os.cpu_count() or 1
    threads = threads or sorted({cores, 1})
    shape = ModelShape.from_model_dir(model_dir)
    profile = Profile(shape, dtype, cores, machine_name())
    tb = token_bytes(shape, profile.dtype_bytes)
    stamps: list = []          # (speed probe, samples it stamps), for the profile's speed record
    total = len(threads) * len(batches) * len(contexts)
    done = 0
    for t in threads:
        config = EngineConfig(attention_ranks=1, expert_ranks=1, micro_batches=1, dtype=dtype, threads_per_rank=t,
                              max_num_seqs=max(batches), max_batch_tokens=max(batches) * max(contexts),
                              kv_cache_tokens=max(batches) * (max(contexts) + steps + 8), max_model_len=max(contexts) + steps + 8,
                              schedule_ahead=0)   # the cost model is per step, head's work included (docs/tuning.md)
        progress(f"[{t} thread(s)] starting a deployment (1 attention rank, 1 expert rank, m=1)")
        dep = Deployment.start(model_dir, config, address=address, progress=lambda msg: None)
        try:
            engine = Engine(config, dep.limits, dep, record_trace=True)
            key = str(t)
            for bucket in ("attention", "expert", "head"):
                profile.samples[bucket][key] = []
            progress(f"[{t} thread(s)] warming up (b={max(batches)}, ctx={max(contexts)})")
            _measure(engine, dep, shape, Profile(shape, dtype, cores, ""), "warm", max(batches), max(contexts), 2, tb, quantile)
            for ctx in contexts:
                for b in batches:
                    stamps.append(_measure(engine, dep, shape, profile, key, b, ctx, steps, tb, quantile))
                    done += 1
                    a = profile.samples["attention"][key][-1]
                    e = profile.samples["expert"][key][-1]
                    progress(f"[{done}/{total}] threads {t}, b={b}, ctx={ctx}: T_a {a[2] * 1e3:.2f} ms, "
                             f"T_e {e[2] * 1e3:.2f} ms ({e[1]:.1f} experts hit), T_c {profile.samples['transfer'][-1][1] * 1e3:.2f} ms")
        finally:
            dep.shutdown()
    for i, (a, e, m, b) in enumerate(calibration):
        if e > shape.num_experts:
            progress(f"[calibration {i + 1}/{len(calibration)}] skipped: {e} expert ranks > {shape.num_experts} experts")
            continue
        progress(f"[calibration {i + 1}/{len(calibration)}] A={a} E={e} m={m} B={b}: running it whole")
        meas = measure_decode(model_dir, a, e, m, b, calibration_ctx, steps=12, dtype=dtype, q=quantile, address=address,
                              probe=speed_probe)
        profile.samples["calibration"].append([a, e, m, b, meas.ctx, meas.step_s])
        profile.samples.setdefault("calibration_spans", []).append(_compute_spans(meas.events, quantile))
        stamps.append((meas.speed_s, [("calibration", None, len(profile.samples["calibration"]) - 1)]))
    if cores >= 2 and not profile.samples["calibration"]:
        # only a fallback: with calibration runs, their traced spans give the slowdown (profile.py)
        k = min(cores, 4)
        progress(f"[contention] the speed probe alone and in {k} processes at once")
        profile.samples["contention"] = concurrent_slowdown(k)
        progress(f"[contention] slowdown {profile.samples['contention']['slowdown']:.2f} per extra rank computing at once")
    profile.rescale_to_reference(stamps, apply=rescale_speed)
    progress(f"machine speed while profiling: probe {profile.speed['range_s'][0] * 1e3:.2f}-"
             f"{profile.speed['range_s'][1] * 1e3:.2f} ms, median {profile.speed['reference_s'] * 1e3:.2f} ms"
             + (" (samples rescaled to it)" if rescale_speed else ""))
    return profile.fit().calibrate()


def _measure(engine, dep, shape: ModelShape, profile: Profile, key: str, b: int, ctx: int, steps: int, tb: float,
             q: float = 0.5) -> tuple[float, list[tuple]]:
    """Measure b sequences at context ctx; returns (the speed probe around the timed steps, the samples added)."""
    for bucket in ("attention", "expert", "head"):
        profile.samples[bucket].setdefault(key, [])
    params = SamplingParams(max_tokens=steps + 2, ignore_eos=True)
    ids = [engine.add_request([(7 * i + 3 * n) % shape.vocab_size for n in range(ctx)], params) for i in range(b)]
    while any(not r.output_token_ids for r in _running(engine)) or len(_running(engine)) < b:
        engine.step()                                     # prefill (maybe chunked) until all decode
    engine.step()                                         # one decode step, not timed: warm
    before = dep.health()[1]
    probes = [speed_probe()]          # the ranks are idle between steps: the engine drives each one
    t_start = time.time()
    engine.trace.clear()                                  # keep the timed steps' spans only
    walls, ctxs = [], []
    for _ in range(steps):
        ctxs.append(statistics.mean(r.num_tokens for r in _running(engine)))
        t0 = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t0)
    probes.append(speed_probe())
    after = dep.health()[1]
    events = engine.trace + dep.expert_trace(since=t_start)
    engine.trace.clear()
    gaps = step_gaps(events, q)
    per_step = [gaps[s] for s in sorted(gaps)]
    spans = sum(g["expert_spans"] for g in per_step) or 1
    hits = (after["expert_gemms"] - before["expert_gemms"]) / spans
    mean_ctx = statistics.mean(ctxs)
    med = lambda k: quantile([g[k] for g in per_step], q)   # noqa: E731
    profile.samples["attention"][key].append((b, mean_ctx, med("attention")))
    profile.samples["expert"][key].append((b * shape.top_k, hits, med("expert")))
    profile.samples["head"][key].append((b, med("head")))
    profile.samples["transfer"].append((b * (tb + shape.hidden_size * profile.dtype_bytes) / 2, max(med("transfer"), 1e-6)))
    overheads = [w - g["extent"] for w, g in zip(walls, per_step)]
    profile.samples["overhead"].append((b, quantile(overheads, q)))
    for i in ids:
        engine.abort(i)
    while engine.has_work():
        engine.step()
    added = [(bucket, key, len(profile.samples[bucket][key]) - 1) for bucket in ("attention", "expert", "head")]
    added += [(bucket, None, len(profile.samples[bucket]) - 1) for bucket in ("transfer", "overhead")]
    return sum(probes) / len(probes), added


def _compute_spans(events: list, q: float) -> list[float]:
    """[attention, expert] span q-quantiles of a run (over layers, micro-batches and steps): they tell the compute
    scale and the overlap slowdown apart, which the step time alone cannot."""
    att = [x.end - x.start for x in events if x.side == "attention" and x.phase == "attention" and x.layer >= 0]
    exp = [x.end - x.start for x in events if x.side == "expert"]
    return [quantile(att, q), quantile(exp, q)]


def _running(engine) -> list:
    return [r for rank in engine.scheduler.running for r in rank]
