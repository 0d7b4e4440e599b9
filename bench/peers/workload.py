"""The peer benchmark's workload and the loop every engine worker runs. Standard library only: it is
imported by workers running in other engines' virtual environments.

Glossary
- case: one batch size: `batch` prompts of `prompt_len` token ids, a warm-up call on other prompts
  of the same shape with `warmup_tokens` new tokens, then `repeats` timed calls with `new_tokens`
  (the measurement is their median: one call of a few hundred ms is at the mercy of a busy VM).
- job: what run_peers.py hands every worker (a JSON file): the model, dtype, threads, the cases,
  and per-engine settings. Every engine gets the same job, so the same token ids.
- measurement: one line a worker prints, `@@peer {json}`; anything else on stdout is the engine's.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
import traceback

MARK = "@@peer "


def random_prompts(batch: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """`batch` prompts of `length` ids in [10, vocab): the same for a given (batch, length, seed) on any machine."""
    rng = random.Random(f"{seed}/{batch}/{length}")
    return [[rng.randrange(10, vocab_size) for _ in range(length)] for _ in range(batch)]


def make_cases(batches: list[int], prompt_len: int, new_tokens: int, warmup_tokens: int, vocab_size: int,
               seed: int, repeats: int = 1) -> list[dict]:
    return [{"batch": b, "prompt_len": prompt_len, "new_tokens": new_tokens, "warmup_tokens": warmup_tokens,
             "repeats": repeats,
             "prompts": random_prompts(b, prompt_len, vocab_size, seed),
             "warmup": random_prompts(b, prompt_len, vocab_size, seed + 1)} for b in batches]


def emit(**record) -> None:
    print(MARK + json.dumps(record), flush=True)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def serve(load) -> None:
    """The worker loop: `load(job)` -> (generate(prompts, n) -> list of token-id lists, info dict, close);
    the load is timed (start-up), then each case runs its warm-up and its timed call."""
    with open(sys.argv[1]) as f:
        job = json.load(f)
    t0 = time.perf_counter()
    try:
        generate, info, close = load(job)
    except Exception as e:
        emit(event="error", stage="load", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-4000:])
        raise SystemExit(1)
    emit(event="loaded", seconds=time.perf_counter() - t0, info=info)
    try:
        for case in job["cases"]:
            try:
                generate(case["warmup"], case["warmup_tokens"])
                calls = []
                for _ in range(case.get("repeats", 1)):
                    t0 = time.perf_counter()
                    outputs = generate(case["prompts"], case["new_tokens"])
                    calls.append(time.perf_counter() - t0)
                seconds = statistics.median(calls)
            except Exception as e:
                emit(event="error", stage="generate", batch=case["batch"], error=f"{type(e).__name__}: {e}",
                     trace=traceback.format_exc()[-4000:])
                continue
            lengths = [len(o) for o in outputs]
            emit(event="result", batch=case["batch"], prompt_len=case["prompt_len"], new_tokens=case["new_tokens"],
                 seconds=seconds, calls_s=calls, tokens=sum(lengths), all_full=all(n == case["new_tokens"] for n in lengths),
                 first_output=list(outputs[0])[:16])
    finally:
        close()
