"""`shuttle run`: offline batch generation, one JSON line per prompt on stdout.

    shuttle run --model DIR --attention-ranks A --expert-ranks E --micro-batches M \
                [--dtype float32|bfloat16] [--max-tokens N] [--temperature T] [--seed S] [--logprobs] \
                (--prompt-ids "1,2,3" ... | --prompts-file FILE.jsonl)

A prompts file holds one JSON object per line: {"token_ids": [..]} or {"prompt": "text"} (text
needs the checkpoint's tokenizer.json). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from scheduler.request import SamplingParams


def add_parser(sub) -> argparse.ArgumentParser:
    from shuttle.cli import add_engine_flags
    p = sub.add_parser("run", help="offline batch generation (JSON lines out)")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded demo model)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-ids", nargs="+", metavar="IDS", help='prompts as comma-separated token ids: "1,2,3"')
    src.add_argument("--prompts-file", metavar="FILE.jsonl", help='JSON lines: {"token_ids": [...]} or {"prompt": "..."}')
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=16)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int, default=None, help="per-request seed (request i uses seed + i)")
    s.add_argument("--ignore-eos", action="store_true")
    s.add_argument("--logprobs", action="store_true", help="add the log-prob of each chosen token")
    p.add_argument("--plan", default=None, help="a deployment plan file (flags override its values)")
    p.add_argument("--address", default=None, help="join this Ray cluster (default: a private local Ray)")
    add_engine_flags(p)
    p.set_defaults(func=run)
    return p


def parse_prompt_ids(values: list[str]) -> list[list[int]]:
    prompts = []
    for i, v in enumerate(values):
        try:
            prompts.append([int(x) for x in v.replace(" ", "").split(",") if x != ""])
        except ValueError:
            raise ValueError(f"--prompt-ids #{i}: {v!r} is not a comma-separated list of integers") from None
    return prompts


def read_prompts_file(path: str, model_dir: str) -> list[list[int]]:
    tokenizer = None
    prompts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
            if "token_ids" in item:
                prompts.append([int(t) for t in item["token_ids"]])
            elif "prompt" in item:
                if tokenizer is None:
                    tokenizer = _load_tokenizer(model_dir, f"{path}:{n}")
                prompts.append(tokenizer.encode(item["prompt"]).ids)
            else:
                raise ValueError(f'{path}:{n}: needs "token_ids" or "prompt"')
    return prompts


def _load_tokenizer(model_dir: str, where: str):
    from tokenizers import Tokenizer
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise ValueError(f"{where}: a text prompt needs {path}; this model takes token_ids only")
    return Tokenizer.from_file(path)


def resolve_model(model: str | None) -> str:
    if model:
        return model
    from models.embedded import default_model_dir
    return default_model_dir()


def run(args: argparse.Namespace) -> int:
    from cluster.deployment import build_engine, describe
    from scheduler.scheduler import validate_request
    from shuttle.cli import engine_config
    from shuttle.plan_file import load_plan_values

    model_dir = resolve_model(args.model)
    prompts = parse_prompt_ids(args.prompt_ids) if args.prompt_ids else read_prompts_file(args.prompts_file, model_dir)
    if not prompts:
        raise ValueError("no prompts given")
    config = engine_config(args, load_plan_values(args.plan) if args.plan else None)
    params = [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, seed=None if args.seed is None else args.seed + i,
                             ignore_eos=args.ignore_eos, logprobs=args.logprobs) for i in range(len(prompts))]

    def say(msg: str) -> None:
        print(f"[shuttle] {msg}", file=sys.stderr, flush=True)

    _, limits, _ = describe(model_dir, config)      # refuse bad input before starting any process
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        try:
            validate_request(limits, prompt, p)
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}") from None
    t0 = time.monotonic()
    engine = build_engine(model_dir, config, address=args.address, progress=say)
    try:
        say(f"up in {time.monotonic() - t0:.1f}s: {config.attention_ranks} attention, {config.expert_ranks} expert ranks, "
            f"{config.micro_batches} micro-batches; generating {len(prompts)} prompts")
        t1 = time.monotonic()
        done = engine.generate(prompts, params, progress=lambda n, total: say(f"{n}/{total} done") if n == total or n % 16 == 0 else None)
        elapsed = time.monotonic() - t1
        for i, c in enumerate(done):
            line = {"index": i, "token_ids": c.token_ids, "finish_reason": c.finish_reason.value}
            if args.logprobs:
                line["logprobs"] = c.logprobs
            print(json.dumps(line), flush=True)
        n_tokens = sum(len(c.token_ids) for c in done)
        say(f"{n_tokens} tokens in {elapsed:.2f}s ({n_tokens / max(elapsed, 1e-9):.1f} tokens/s)")
    finally:
        engine.shutdown()
    return 0
