"""Decode throughput: Shuttle (A=1, E=1, M=1 and M=2) beside Hugging Face `generate`, and the roofline.

The model: Mixtral format, hidden 512, intermediate 1024, 8 layers, 16 experts top-2, 8 heads /
2 KV heads, vocab 32000, float32, random weights (built once into --cache).

For each batch size b: b prompts of --prompt-len tokens, then --steps decode steps.
- HF: per-step decode time = (generate(steps) - generate(1)) / (steps - 1), all cores.
- Shuttle: the median of the timed decode steps (after every request has its first token).
- Roofline: bytes a decode step must read (non-expert weights, the distinct experts the batch hit —
  counted by the expert rank —, and the KV cache) over the read bandwidth measured in this run.

    .venv/bin/python bench/decode_bench.py [--batches 1 8 32 64] [--steps 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

for k, v in {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
             "GLOO_SOCKET_IFNAME": "lo", "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(k, v)

from bench.random_mixtral import build_random_mixtral  # noqa: E402
from cluster.deployment import Deployment  # noqa: E402
from models.spec import load_spec  # noqa: E402
from scheduler.config import EngineConfig  # noqa: E402
from scheduler.engine import Engine  # noqa: E402
from scheduler.request import SamplingParams  # noqa: E402


BENCH_MODEL_DIR = os.path.expanduser("~/.cache/shuttle/bench-mixtral-h512-e16")   # built once, shared by the benchmarks


def build_model(path: str = BENCH_MODEL_DIR) -> str:
    return build_random_mixtral(path, vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                                num_attention_heads=8, num_key_value_heads=2, num_local_experts=16,
                                num_experts_per_tok=2, max_position_embeddings=4096)


def read_bandwidth_gbs(mb: int = 1024, repeats: int = 7) -> float:
    """Median GB/s of summing a buffer much larger than the caches, with all threads."""
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times) / 1e9


def prompts_for(batch: int, length: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed + batch)
    return torch.randint(10, 32000, (batch, length), generator=g).tolist()


def hf_step_ms(model_dir: str, batches: list[int], prompt_len: int, steps: int) -> dict[int, float]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        for b in batches:
            ids = torch.tensor(prompts_for(b, prompt_len))
            mask = torch.ones_like(ids)

            def gen(n):
                t0 = time.perf_counter()
                model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
                return time.perf_counter() - t0
            gen(2)  # warm-up
            runs = [(gen(steps) - gen(1)) / (steps - 1) for _ in range(3)]
            out[b] = statistics.median(runs) * 1e3
            print(f"  HF batch {b}: {out[b]:.1f} ms/step", file=sys.stderr)
    del model
    return out


VARIANTS = {"m1": {"micro_batches": 1}, "m2": {"micro_batches": 2}, "colocated": {"micro_batches": 1, "colocate": True}}


def shuttle_steps(model_dir: str, variant: str, batches: list[int], prompt_len: int, steps: int) -> dict[int, dict]:
    config = EngineConfig(attention_ranks=1, expert_ranks=1, max_batch_tokens=max(batches) * prompt_len,
                          max_num_seqs=max(batches), kv_cache_tokens=max(batches) * (prompt_len + steps + 16), max_model_len=1024,
                          **VARIANTS[variant])
    dep = Deployment.start(model_dir, config)
    results = {}
    try:
        engine = Engine(config, dep.limits, dep)
        for b in batches:
            params = SamplingParams(max_tokens=steps + 1, ignore_eos=True)
            for p in prompts_for(b, prompt_len):
                engine.add_request(p, params)
            engine.step()                              # prefill (the budget covers every prompt)
            engine.step()                              # warm-up decode step
            before = dep.health()[-1]                  # the expert rank's counters (colocated: all in one)
            times, ctx = [], []
            for _ in range(steps - 1):
                ctx.append(sum(r.num_tokens for r in engine.scheduler.running[0]))
                t0 = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - t0)
            after = dep.health()[-1]
            while engine.has_work():
                engine.step()
            n = len(times)
            results[b] = {
                "step_ms": statistics.median(times) * 1e3,
                "expert_reads_per_step": (after["expert_reads"] - before["expert_reads"]) / n,
                "expert_gemms_per_step": (after["expert_gemms"] - before["expert_gemms"]) / n,
                "expert_compute_ms": (after["compute_s"] - before["compute_s"]) / n * 1e3,
                "kv_tokens_per_step": statistics.mean(ctx),
            }
            print(f"  Shuttle {variant} batch {b}: {results[b]['step_ms']:.1f} ms/step", file=sys.stderr)
    finally:
        dep.shutdown()
    return results


def bytes_per_step(spec, r: dict) -> float:
    """Weights (fp32) a decode step reads at least, plus its KV cache."""
    H, V, L = spec.hidden_size, spec.vocab_size, spec.num_layers
    attn = L * (H * (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim + spec.num_heads * spec.head_dim * H
                + spec.num_experts * H + 2 * H)
    dense = attn + V * H + H                                   # + lm_head + final norm (embedding rows: negligible)
    experts = r["expert_reads_per_step"] * spec.bytes_per_expert(4) / 4
    kv = r["kv_tokens_per_step"] * L * 2 * spec.num_kv_heads * spec.head_dim
    return 4 * (dense + experts + kv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--cache", default=BENCH_MODEL_DIR)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "decode.json"))
    args = ap.parse_args()
    model_dir = build_model(args.cache)
    spec = load_spec(model_dir)
    torch.set_num_threads(os.cpu_count())
    bw = read_bandwidth_gbs()
    print(f"read bandwidth {bw:.1f} GB/s; HF generate ...", file=sys.stderr)
    hf = {b: float("nan") for b in args.batches} if args.skip_hf else hf_step_ms(model_dir, args.batches, args.prompt_len, args.steps)
    bw_after = read_bandwidth_gbs()
    shuttle = {v: shuttle_steps(model_dir, v, args.batches, args.prompt_len, args.steps) for v in args.variants}
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    rows = []
    for b in args.batches:
        row = {"batch": b, "hf_ms": hf[b]}
        for v in args.variants:
            r = shuttle[v][b]
            row[f"{v}_ms"] = r["step_ms"]
            row[f"{v}_detail"] = r
        row["roofline_ms"] = bytes_per_step(spec, shuttle[args.variants[0]][b]) / (bw * 1e9) * 1e3
        rows.append(row)
    print(f"\nMachine: {machine}; read bandwidth {bw:.1f} GB/s (before HF) / {bw_after:.1f} GB/s (after)")
    print(f"Model: Mixtral-format h512 i1024 L8 E16 top-2, vocab 32000, fp32; prompt {args.prompt_len}, {args.steps} decode steps")
    print("| batch | HF ms/step | " + " | ".join(f"{v} ms/step | {v} vs HF | {v} % roofline" for v in args.variants) + " | roofline ms |")
    print("|---|---|" + "---|---|---|" * len(args.variants) + "---|")
    for r in rows:
        cells = [f"{r[v + '_ms']:.1f} | {r['hf_ms'] / r[v + '_ms']:.2f}× | {100 * r['roofline_ms'] / r[v + '_ms']:.0f}%"
                 for v in args.variants]
        print(f"| {r['batch']} | {r['hf_ms']:.1f} | " + " | ".join(cells) + f" | {r['roofline_ms']:.1f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "bandwidth_gbs": bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
