"""llama.cpp worker (any python3): runs the vendored `llama-batched-bench` once per case shape and turns its
JSONL rows into measurements.

    python3 bench/peers/worker_llamacpp.py JOB.json

How its figures map onto the workload (the others: prefill, which yields the first token, then n-1
decode steps): `-npp P -ntg W-1,N-1 -npl B1,B2,...`: for each batch size a warm-up with W tokens, then
the timed run, a prefill of B prompts of P tokens followed by N-1 decode steps of B tokens. Seconds =
its total `t` (prefill included); with N = 1 (time to first token) its prefill time `t_pp`.
Differences, kept: the prompt ids are its own random ones (the throughput does not depend on the ids
of a random-weight model), and it feeds tokens back without sampling, so it skips the argmax.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

from workload import emit, say

FIELD = re.compile(r'"(\w+)":\s*([-+0-9.eE]+|inf|-inf|nan)')


def rows_of(text: str) -> list[dict]:
    """batched-bench's JSONL rows (its speeds may be `inf`, which JSON lacks, so fields are read one by one)."""
    return [{k: float(v) for k, v in FIELD.findall(line)} for line in text.splitlines()
            if line.startswith("{") and '"pl"' in line]


def main(job_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    cfg = job["llamacpp"]
    exe = os.path.join(cfg["bin_dir"], "llama-batched-bench")
    threads = str(job["threads"])
    shapes: dict[tuple, list[dict]] = {}
    for case in job["cases"]:
        shapes.setdefault((case["prompt_len"], case["new_tokens"], case["warmup_tokens"]), []).append(case)
    t_start = time.perf_counter()
    for (pp, n, w), cases in shapes.items():
        batches = [c["batch"] for c in cases]
        tg = [max(1, w - 1), max(1, n - 1)]
        ctx = -(-max(batches) * (pp + max(tg)) // 256) * 256 + 256
        cmd = [exe, "-m", cfg["gguf"], "-npp", str(pp), "-ntg", ",".join(map(str, tg)), "-npl", ",".join(map(str, batches)),
               "-c", str(ctx), "-b", "2048", "-ub", "512", "-t", threads, "-tb", threads,
               "-ctk", cfg["kv_type"], "-ctv", cfg["kv_type"], "--output-format", "jsonl", *cfg.get("extra_args", [])]
        say("$ " + " ".join(cmd))
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        say(proc.stderr[-6000:] + proc.stdout[-6000:])
        rows = rows_of(proc.stdout + "\n" + proc.stderr)
        if proc.returncode != 0 or len(rows) != 2 * len(batches):
            for b in batches:
                emit(event="error", stage="generate", batch=b, error=f"llama-batched-bench exit {proc.returncode}, "
                     f"{len(rows)} rows for {2 * len(batches)} runs", trace=(proc.stdout + proc.stderr)[-4000:])
            continue
        timed = rows[len(batches):]                 # rows come tg-major: the warm-ups first
        emit(event="loaded", seconds=wall - sum(r["t"] for r in rows), info={
            "command": cmd, "gguf": cfg["gguf"], "flash_attn": timed[0].get("flash_attn"),
            "n_kv_max": timed[0].get("n_kv_max"), "threads": timed[0].get("n_threads")})
        for case, row in zip(cases, timed):
            if int(row["pl"]) != case["batch"]:
                emit(event="error", stage="generate", batch=case["batch"], error=f"row for pl={row['pl']}")
                continue
            seconds = row["t_pp"] if n == 1 else row["t"]
            emit(event="result", batch=case["batch"], prompt_len=pp, new_tokens=n, seconds=seconds,
                 tokens=case["batch"] * n, all_full=True, first_output=None, t_pp=row["t_pp"], t_tg=row["t_tg"])
    say(f"llama.cpp worker done in {time.perf_counter() - t_start:.1f}s")
    return 0


if __name__ == "__main__":
    import sys
    raise SystemExit(main(sys.argv[1]))
