"""Where one decode step's time goes, on the compute alone: the colocated ranks in this process.

The attention rank and the expert rank(s) run as `cluster.colocated.ColocatedRanks` (the in-process
transfer backend, the expert loop on its own thread), driven by the head's Engine without Ray, so
what is measured is the model's work and the Python around it, not process switches. Each phase is
timed by wrapping the function that does it; "other" is the step's wall time minus the phases
(the executor, the chunk and batch building, the head's scheduling and postprocessing).

    .venv/bin/python bench/step_breakdown.py [--batches 1 8 32 64] [--steps 16] [--dtype float32]

Phases: attention (QKV, rotary, paged attention, O: per layer; in decode steps where the layer runs
as one `decode_block` call, also its norms, residual add and router), router, experts (the expert rank's
grouped FFN, including its sort and sum), layers (decode steps whose every layer, experts included,
runs as one `DecodeLayers` call: attention and experts together), lm_head, sampler; "other" is the
rest (batch building, the head's scheduling, the Python around the calls). Greedy decode steps run
as one `DecodeLayers.greedy_steps` call a step here (the engine's default of one step a call): its
layers count as "layers" and its LM head and greedy pick as "lm_head" (no "sampler"). `--layer-by-layer`
turns the one-call paths off, so that attention and expert phases show separately.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import attention_node.forward as forward_mod  # noqa: E402
import attention_node.rank as rank_mod  # noqa: E402
from bench.decode_bench import BENCH_MODEL_DIR, build_model, prompts_for  # noqa: E402
from cluster.colocated import ColocatedRanks, InProcessColocated  # noqa: E402
from cluster.threads import rank_threads, small_step_threads, useful_threads  # noqa: E402
from expert_node.experts import ExpertShard  # noqa: E402
from models.spec import load_spec  # noqa: E402
from scheduler.config import EngineConfig, EngineLimits  # noqa: E402
from scheduler.engine import Engine  # noqa: E402
from scheduler.placement import Placement  # noqa: E402
from scheduler.request import SamplingParams  # noqa: E402

SECONDS: dict[str, float] = collections.defaultdict(float)
_LOCK = threading.Lock()


def timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            with _LOCK:
                SECONDS[name] += time.perf_counter() - t0
    return wrapper


class _TimedLayers:
    """A `DecodeLayers` whose `run` is timed as the "layers" phase; its `greedy_steps` (a call's greedy
    decode steps in one kernel call) reports its own split, taken below."""

    def __init__(self, fused):
        self.fused = fused
        self.run = timed("layers", fused.run)
        self.greedy_steps = fused.greedy_steps


def instrument(layer_by_layer: bool = False) -> None:
    real = forward_mod.AttentionForward._decode_layers

    def decode_layers(self, kernels, experts):
        if layer_by_layer:
            return None
        fused = real(self, kernels, experts)
        return None if fused is None else _TimedLayers(fused)
    forward_mod.AttentionForward._decode_layers = decode_layers
    real_greedy = forward_mod.AttentionForward.greedy_steps

    def greedy_steps(self, *args):
        got = real_greedy(self, *args)
        if got is not None:      # (tokens, stopped logits, seconds in the layers, seconds in the LM head and pick)
            with _LOCK:
                SECONDS["layers"] += got[2]
                SECONDS["lm_head"] += got[3]
        return got
    forward_mod.AttentionForward.greedy_steps = greedy_steps
    forward_mod.AttentionForward.attention = timed("attention", forward_mod.AttentionForward.attention)
    forward_mod.AttentionForward.decode_block = timed("attention", forward_mod.AttentionForward.decode_block)
    forward_mod.route = timed("router", forward_mod.route)
    forward_mod.AttentionForward.logits = timed("lm_head", forward_mod.AttentionForward.logits)
    rank_mod.sample = timed("sampler", rank_mod.sample)
    ExpertShard.forward = timed("experts", ExpertShard.forward)


def build(model_dir: str, batch: int, prompt_len: int, steps: int, dtype: str) -> Engine:
    spec = load_spec(model_dir)
    config = EngineConfig(max_batch_tokens=batch * prompt_len, max_num_seqs=batch, dtype=dtype, colocate=True,
                          kv_cache_tokens=batch * (prompt_len + steps + 16), max_model_len=max(1024, prompt_len + steps + 16))
    limits = EngineLimits.derive(config, max_position_embeddings=spec.max_position_embeddings,
                                 vocab_size=spec.vocab_size, eos_token_ids=spec.eos_token_ids)
    cores = os.cpu_count()
    full = useful_threads(rank_threads(cores, 1, 1, 1), spec.hidden_size, spec.moe_intermediate_size)
    small = small_step_threads("cpu", 1, 1, colocated=True) or full
    placement = Placement.contiguous(spec.num_experts, 1)
    ranks = ColocatedRanks(spec, config, limits, model_dir, "cpu", (min(small, full), full), [placement.experts_of(0)])
    return Engine(config, limits, InProcessColocated(ranks))


def measure(engine: Engine, batch: int, prompt_len: int, steps: int) -> dict:
    params = SamplingParams(max_tokens=steps + 2, ignore_eos=True)
    for p in prompts_for(batch, prompt_len):
        engine.add_request(p, params)
    engine.step()                       # prefill
    engine.step()                       # warm-up decode
    SECONDS.clear()
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t0)
    while engine.has_work():
        engine.step()
    total = sum(walls)
    per_step = {k: v / steps * 1e3 for k, v in SECONDS.items()}
    return {"step_ms_median": statistics.median(walls) * 1e3, "step_ms_mean": total / steps * 1e3, "phases_ms": per_step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--cache", default=BENCH_MODEL_DIR)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "step_breakdown.json"))
    ap.add_argument("--label", default="", help="a name for this result in plots")
    ap.add_argument("--layer-by-layer", action="store_true",
                    help="run decode steps a layer at a time (no DecodeLayers call), so that attention and experts show apart")
    ap.add_argument("--plot", nargs="+", metavar="RESULT.json",
                    help="draw saved results side by side (stacked bars per batch) into --png instead of measuring")
    ap.add_argument("--png", default=os.path.join(ROOT, "docs", "step_breakdown.png"))
    args = ap.parse_args()
    if args.plot:
        plot(args.plot, args.png)
        return
    model_dir = build_model(args.cache)
    instrument(args.layer_by_layer)
    rows = []
    for b in args.batches:
        engine = build(model_dir, b, args.prompt_len, args.steps, args.dtype)
        try:
            r = measure(engine, b, args.prompt_len, args.steps)
        finally:
            engine.shutdown()
        ph = r["phases_ms"]
        ph["other"] = r["step_ms_mean"] - sum(ph.values())
        rows.append({"batch": b, **r})
        print(f"batch {b}: {r['step_ms_median']:.1f} ms/step (mean {r['step_ms_mean']:.1f}): "
              + ", ".join(f"{k} {v:.1f}" for k, v in sorted(ph.items(), key=lambda kv: -kv[1])), file=sys.stderr)
    print("| batch | step ms | " + " | ".join(PHASES) + " |")
    print("|---|---|" + "---|" * len(PHASES))
    for r in rows:
        print(f"| {r['batch']} | {r['step_ms_median']:.1f} | "
              + " | ".join(f"{r['phases_ms'].get(p, 0.0):.1f}" for p in PHASES) + " |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": f"{os.cpu_count()} cores, torch {torch.__version__}", "dtype": args.dtype, "rows": rows,
                   "label": args.label}, f, indent=1)


PHASES = ["attention", "router", "experts", "layers", "lm_head", "sampler", "other"]


def plot(results: list[str], png: str) -> None:
    """Stacked bars of each phase's ms per decode step: one bar per (batch, result file)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = []
    for path in results:
        with open(path) as f:
            runs.append((json.load(f).get("label", os.path.basename(path)), json.load(open(path))["rows"]))
    batches = [r["batch"] for r in runs[0][1]]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(runs)
    colors = dict(zip(PHASES, plt.cm.tab10.colors))
    for k, (label, rows) in enumerate(runs):
        by_batch = {r["batch"]: r["phases_ms"] for r in rows}
        for i, b in enumerate(batches):
            bottom = 0.0
            for ph in PHASES:
                v = by_batch[b].get(ph, 0.0)
                ax.bar(i + (k - (len(runs) - 1) / 2) * width, v, width * 0.95, bottom=bottom, color=colors[ph],
                       label=ph if (k, i) == (0, 0) else None, alpha=1.0 if k == len(runs) - 1 else 0.55)
                bottom += v
            ax.text(i + (k - (len(runs) - 1) / 2) * width, bottom + 1, label, ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("ms per decode step")
    ax.set_ylim(0, 1.15 * max(sum(r["phases_ms"].values()) for _, rows in runs for r in rows))
    ax.set_title("Where a decode step goes (bench model, 2 cores; colocated ranks, compute only)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}", file=sys.stderr)

if __name__ == "__main__":
    main()
