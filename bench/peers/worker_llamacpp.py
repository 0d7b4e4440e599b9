"""llama.cpp worker (any python3): runs the vendored `llama-batched-bench` once per case shape and turns its
JSONL rows into measurements.

    python3 bench/peers/worker_llamacpp.py JOB.json

How its figures map onto the workload (the others: prefill, which yields the first token, then n-1
decode steps): `-npp P -ntg W-1,N-1 -npl B1,B2,...`: for each batch size a warm-up with W tokens, then
the timed run (R times, `-ntg W-1,N-1,N-1,...` for R repeats), a prefill of B prompts of P tokens
followed by N-1 decode steps of B tokens. Seconds = the median of its total `t` over the R runs
(prefill included); with N = 1 (time to first token) of its prefill time `t_pp`.
Differences, kept: the prompt ids are its own random ones (the throughput does not depend on the ids
of a random-weight model), and it feeds tokens back without sampling, so it skips the argmax.
"""

from __future__ import annotations

import json
import os
import re
import statistics
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
        shapes.setdefault((case["prompt_len"], case["new_tokens"], case["warmup_tokens"], case.get("repeats", 1)),
                          []).append(case)
    t_start = time.perf_counter()
    for (pp, n, w, repeats), cases in shapes.items():
        batches = [c["batch"] for c in cases]
        tg = [max(1, w - 1)] + [max(1, n - 1)] * repeats
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
        if proc.returncode != 0 or len(rows) != len(tg) * len(batches):
            for b in batches:
                emit(event="error", stage="generate", batch=b, error=f"llama-batched-bench exit {proc.returncode}, "
                     f"{len(rows)} rows for {len(tg) * len(batches)} runs", trace=(proc.stdout + proc.stderr)[-4000:])
            continue
        # rows come tg-major: the warm-ups first, then each repeat's row per batch size
        timed = [rows[len(batches) * (1 + j):len(batches) * (2 + j)] for j in range(repeats)]
        emit(event="loaded", seconds=wall - sum(r["t"] for r in rows), info={
            "command": cmd, "gguf": cfg["gguf"], "flash_attn": timed[0][0].get("flash_attn"),
            "n_kv_max": timed[0][0].get("n_kv_max"), "threads": timed[0][0].get("n_threads")})
        for i, case in enumerate(cases):
            runs = [timed[j][i] for j in range(repeats)]
            if any(int(row["pl"]) != case["batch"] for row in runs):
                emit(event="error", stage="generate", batch=case["batch"], error=f"rows for pl={[row['pl'] for row in runs]}")
                continue
            calls = [row["t_pp"] if n == 1 else row["t"] for row in runs]
            mid = sorted(range(repeats), key=lambda j: calls[j])[(repeats - 1) // 2]    # the median run (lower middle)
            emit(event="result", batch=case["batch"], prompt_len=pp, new_tokens=n, seconds=statistics.median(calls),
                 calls_s=calls, tokens=case["batch"] * n, all_full=True, first_output=None, t_pp=runs[mid]["t_pp"],
                 t_tg=runs[mid]["t_tg"])
    say(f"llama.cpp worker done in {time.perf_counter() - t_start:.1f}s")
    return 0


if __name__ == "__main__":
    import sys
    raise SystemExit(main(sys.argv[1]))
