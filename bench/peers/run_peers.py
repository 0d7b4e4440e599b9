"""Shuttle beside the engines a user would pick instead, on one workload, interleaved round by round.

    .venv/bin/python bench/peers/run_peers.py [--engines shuttle,hf,vllm,llamacpp] [--batches 1,8,32,64]
        [--rounds 5] [--dtype float32|bfloat16] [--ttft] [--out RESULT.json]

Install the peers first (bench/peers/setup_peers.py; README.md beside this file). Per round, each engine
runs in its own subprocess (its venv's python; llama.cpp's binary) that loads the model once and serves
every batch size: a warm-up call (4 new tokens), then `--repeats` (3) timed calls of b prompts × 32 random
token ids (fixed seed: the same ids for every engine), 64 new tokens, greedy, EOS ignored. tok/s = b × 64
/ the median timed call's wall time (prefill included, start-up excluded). `--ttft`: time to first token of one
512-token prompt instead. The engine order rotates each round; the 1-minute load average (and the CPU
the other processes on the machine used) is sampled while each engine runs.

Writes RESULT.json (every round raw, medians, per-round ratios to Shuttle, the machine), RESULT.md (the
table, also printed) and RESULT.png (bars); per-engine logs in RESULT.logs/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import report  # noqa: E402
from setup_peers import DEFAULT_CACHE, SHUTTLE_PYTHON, read_stamp  # noqa: E402
from workload import MARK, make_cases  # noqa: E402

ENGINES = ("shuttle", "hf", "vllm", "llamacpp")
BENCH_MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=2, num_local_experts=16, num_experts_per_tok=2, max_position_embeddings=4096)


# ---- the machine and its load ------------------------------------------------------------------
def machine_info() -> dict:
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "kernel": platform.release(), "python": platform.python_version(),
            "cores": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu_model"] = fields.get("Model name")
        info["lscpu_cpus"] = fields.get("CPU(s)")
        info["threads_per_core"] = fields.get("Thread(s) per core")
        info["flags"] = sorted(f for f in fields.get("Flags", "").split() if f.startswith(("avx512", "amx")))
        info["hypervisor"] = fields.get("Hypervisor vendor")
    except OSError as e:
        info["lscpu_error"] = str(e)
    try:
        info["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    import torch
    info["torch"] = torch.__version__
    return info


def _busy_ticks() -> int:
    """Busy CPU ticks of the whole machine so far (all time minus idle and iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4]


def _ticks_of(pids: set[int]) -> dict[int, int]:
    """utime + stime of each live process in `pids` (threads included)."""
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            out[pid] = int(parts[11]) + int(parts[12])
        except (OSError, IndexError, ValueError):
            pass
    return out


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(name))
            except (OSError, IndexError, ValueError):
                pass
    seen, todo = {root}, [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


class LoadSampler(threading.Thread):
    """Every `period` s: the 1-minute load average, and how many cores the machine's OTHER processes kept
    busy (all busy CPU time minus this benchmark's process tree; a process of ours that exits between
    two samples is counted as other, so the figure errs high)."""

    def __init__(self, period: float = 2.0):
        super().__init__(daemon=True)
        self.period, self.samples, self.measuring = period, [], False
        self._done = threading.Event()

    def run(self) -> None:
        hz = os.sysconf("SC_CLK_TCK")
        last_busy, last_ours, last_t = _busy_ticks(), _ticks_of(_descendants(os.getpid())), time.monotonic()
        while not self._done.wait(self.period):
            busy, ours, t = _busy_ticks(), _ticks_of(_descendants(os.getpid())), time.monotonic()
            ours_delta = sum(v - last_ours.get(pid, 0) for pid, v in ours.items())
            others = max(0.0, ((busy - last_busy) - ours_delta) / hz / (t - last_t))
            self.samples.append({"t": time.time(), "load1": os.getloadavg()[0], "other_cores": round(others, 2),
                                 "measuring": self.measuring})
            last_busy, last_ours, last_t = busy, ours, t

    def stop(self) -> None:
        self._done.set()
        self.join()

    def window(self, since: float) -> dict:
        s = [x for x in self.samples if x["t"] >= since]
        m = [x for x in s if x["measuring"]]
        return {"load1_start": os.getloadavg()[0] if not s else s[0]["load1"],
                "max_measuring": max((x["load1"] for x in m), default=None),
                "mean_measuring": sum(x["load1"] for x in m) / len(m) if m else None,
                "max_overall": max((x["load1"] for x in s), default=None),
                "other_cores_mean_measuring": round(sum(x["other_cores"] for x in m) / len(m), 2) if m else None,
                "samples": [(round(x["t"] - since, 1), x["load1"], x["other_cores"], x["measuring"]) for x in s]}


# ---- engines -----------------------------------------------------------------------------------
def resolve_engines(names: list[str], cache: str) -> dict[str, dict]:
    """What runs each engine, or why it cannot."""
    out = {}
    for name in names:
        if name in ("shuttle", "hf"):
            ok = os.path.isfile(SHUTTLE_PYTHON)
            out[name] = {"status": "ok" if ok else f"not installed: {SHUTTLE_PYTHON} missing (run ./dev test once)",
                         "cmd": [SHUTTLE_PYTHON, os.path.join(HERE, f"worker_{name}.py")]}
        else:
            stamp = read_stamp(os.path.join(cache, name))
            if stamp is None:
                where = "" if cache == DEFAULT_CACHE else f" --cache {cache}"
                out[name] = {"status": f"not installed: run `nice -n 19 python3 bench/peers/setup_peers.py --peer {name}{where}`"}
            elif not os.access(stamp.get("python") or stamp.get("bin", {}).get("llama-batched-bench", ""), os.X_OK):
                out[name] = {"status": f"broken install in {cache}/{name} (its stamp names a missing program): "
                                       f"run setup_peers.py --peer {name} --force"}
            elif name == "vllm":
                out[name] = {"status": "ok", "versions": stamp, "cmd": [stamp["python"], os.path.join(HERE, "worker_vllm.py")]}
            else:
                out[name] = {"status": "ok", "versions": stamp, "cmd": [sys.executable, os.path.join(HERE, "worker_llamacpp.py")]}
    return out


def gguf_for(stamp: dict, model_dir: str, outtype: str, cache: str) -> str:
    """The model as GGUF (made once per model and type with the vendored converter)."""
    path = os.path.join(cache, "gguf", f"{os.path.basename(os.path.normpath(model_dir))}-{outtype}.gguf")
    if os.path.isfile(path) and os.path.getmtime(path) >= os.path.getmtime(os.path.join(model_dir, "config.json")):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    llama_dir = os.path.dirname(stamp["converter"])
    print(f"converting {model_dir} to {path} ({outtype}) ...", file=sys.stderr, flush=True)
    subprocess.run([SHUTTLE_PYTHON, os.path.join(HERE, "to_gguf.py"), llama_dir, model_dir, path, "--outtype", outtype],
                   check=True, stdout=sys.stderr)
    return path


def run_worker(name: str, cmd: list[str], job_path: str, log_path: str, timeout: float, sampler: LoadSampler) -> dict:
    """Start the worker in its own session (so a timeout ends its whole tree), relay its measurements."""
    t0 = time.perf_counter()
    run = {"results": [], "errors": [], "startup_s": None, "info": None, "log": log_path}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd + [job_path], stdout=subprocess.PIPE, stderr=log, text=True, cwd=HERE,
                                start_new_session=True)
        timer = threading.Timer(timeout, lambda: _kill_tree(proc))
        timer.start()
        try:
            for line in proc.stdout:
                if not line.startswith(MARK):
                    log.write(line)
                    continue
                rec = json.loads(line[len(MARK):])
                event = rec.pop("event")
                if event == "loaded":
                    run["startup_s"], run["info"] = rec["seconds"], rec["info"]
                    sampler.measuring = True
                    print(f"  {name}: loaded in {rec['seconds']:.1f}s", file=sys.stderr, flush=True)
                elif event == "result":
                    run["results"].append(rec)
                    rate = (f"{rec['seconds'] * 1e3:.0f} ms to first token" if rec["new_tokens"] == 1
                            else f"{rec['batch'] * rec['new_tokens'] / rec['seconds']:.1f} tok/s")
                    print(f"  {name}: batch {rec['batch']}: {rec['seconds']:.3f}s, {rate}"
                          + ("" if rec["all_full"] else "  (NOT every prompt got all its tokens)"), file=sys.stderr, flush=True)
                else:
                    run["errors"].append(rec)
                    print(f"  {name}: ERROR {rec.get('stage')} batch {rec.get('batch', '-')}: {rec['error']}", file=sys.stderr, flush=True)
            proc.wait()
        finally:
            timer.cancel()
            sampler.measuring = False
            if proc.poll() is None:
                _kill_tree(proc)
    run["returncode"] = proc.returncode
    run["wall_s"] = time.perf_counter() - t0
    if proc.returncode != 0:
        why = "timed out" if proc.returncode in (-9, -15) and run["wall_s"] >= timeout else f"exit {proc.returncode}"
        run["errors"].append({"stage": "process", "error": f"{why}; see {log_path}"})
        print(f"  {name}: {why} (log {log_path})", file=sys.stderr, flush=True)
    return run


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass


def parse_opts(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except ValueError:
            out[key.replace("-", "_")] = value
    return out


def main() -> None:
    cores = os.cpu_count() or 1
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, from " + ", ".join(ENGINES))
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--ttft", action="store_true", help="time to first token at batch 1 of a --ttft-prompt-len prompt")
    ap.add_argument("--ttft-prompt-len", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--warmup-tokens", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed calls per case and round (after one warm-up); a round's figure is their median")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--load-threshold", type=float, default=None,
                    help="1-min load average under which a round counts as quiet (default: threads + 0.8 × cores)")
    ap.add_argument("--model-dir", default=os.path.expanduser("~/.cache/shuttle/bench-mixtral-h512-e16"),
                    help="the bench checkpoint (made here if missing; the same one bench/decode_bench.py uses)")
    ap.add_argument("--cache", default=DEFAULT_CACHE, help="where setup_peers.py installed the peers")
    ap.add_argument("--out", default=None, help="RESULT.json (default bench/results/peers-<mode>-<dtype>-<time>.json)")
    ap.add_argument("--engine-timeout", type=float, default=1800, help="seconds one engine's subprocess may take in a round")
    ap.add_argument("--shuttle-opt", action="append", default=[], metavar="FIELD=VALUE",
                    help="an EngineConfig field for Shuttle, e.g. micro_batches=2 (repeatable)")
    ap.add_argument("--vllm-opt", action="append", default=[], metavar="ARG=VALUE", help="an extra vllm.LLM argument (repeatable)")
    ap.add_argument("--llamacpp-arg", action="append", default=[], help="an extra llama-batched-bench argument (repeatable)")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")

    names = [e.strip() for e in args.engines.split(",") if e.strip()]
    if unknown := set(names) - set(ENGINES):
        ap.error(f"unknown engines {sorted(unknown)}; choose from {ENGINES}")
    mode = "ttft" if args.ttft else "throughput"
    batches = [1] if args.ttft else [int(b) for b in args.batches.split(",")]
    threshold = args.load_threshold if args.load_threshold is not None else args.threads + 0.8 * cores
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = os.path.abspath(args.out) if args.out else os.path.join(REPO, "bench", "results", f"peers-{mode}-{args.dtype}-{stamp}.json")
    base = out[:-5] if out.endswith(".json") else out
    os.makedirs(base + ".logs", exist_ok=True)

    from bench.random_mixtral import build_random_mixtral
    model_dir = build_random_mixtral(args.model_dir, **BENCH_MODEL)
    with open(os.path.join(model_dir, "config.json")) as f:
        model_config = json.load(f)

    engines = resolve_engines(names, args.cache)
    for name, e in engines.items():
        print(f"{name}: {e['status']}", file=sys.stderr)
    runnable = [n for n in names if engines[n]["status"] == "ok"]

    prompt_len = args.ttft_prompt_len if args.ttft else args.prompt_len
    new_tokens = 1 if args.ttft else args.new_tokens
    warmup_tokens = 1 if args.ttft else args.warmup_tokens
    job = {"model_dir": model_dir, "dtype": args.dtype, "threads": args.threads,
           "cases": make_cases(batches, prompt_len, new_tokens, warmup_tokens, model_config["vocab_size"], args.seed,
                               args.repeats),
           "shuttle_opts": parse_opts(args.shuttle_opt), "vllm_opts": parse_opts(args.vllm_opt)}
    ggufs = {}
    if "llamacpp" in runnable:
        try:
            ggufs = {t: gguf_for(engines["llamacpp"]["versions"], model_dir, t, args.cache) for t in ("f32", "bf16")}
            kind = "f32" if args.dtype == "float32" else "bf16"
            job["llamacpp"] = {"bin_dir": os.path.dirname(engines["llamacpp"]["versions"]["bin"]["llama-batched-bench"]),
                               "gguf": ggufs[kind], "kv_type": kind, "extra_args": args.llamacpp_arg}
        except subprocess.CalledProcessError as e:
            engines["llamacpp"]["status"] = f"GGUF conversion failed: {e}"
            runnable.remove("llamacpp")
    job_path = base + ".logs/job.json"
    with open(job_path, "w") as f:
        json.dump(job, f)

    result = {"schema": "shuttle-peers/1", "mode": mode, "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "settings": {"engines": names, "batches": batches, "rounds": args.rounds, "dtype": args.dtype,
                           "prompt_len": prompt_len, "new_tokens": new_tokens, "warmup_tokens": warmup_tokens,
                           "repeats": args.repeats, "threads": args.threads, "seed": args.seed, "load_threshold": threshold, "model_dir": model_dir,
                           "model_config": {k: model_config.get(k) for k in BENCH_MODEL}, "gguf": ggufs,
                           "shuttle_opts": job["shuttle_opts"], "vllm_opts": job["vllm_opts"],
                           "llamacpp_args": args.llamacpp_arg, "command": sys.argv},
              "machine": machine_info(),
              "engines": {n: {k: v for k, v in e.items() if k != "cmd"} for n, e in engines.items()},
              "rounds": []}

    def save() -> None:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)

    sampler = LoadSampler()
    sampler.start()
    try:
        for r in range(args.rounds):
            order = runnable[r % len(runnable):] + runnable[:r % len(runnable)] if runnable else []
            since = time.time()
            rnd = {"round": r, "order": order, "started": datetime.datetime.now().isoformat(timespec="seconds"), "engines": {}}
            result["rounds"].append(rnd)
            print(f"round {r + 1}/{args.rounds}: {' → '.join(order)} (1-min load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
            for name in order:
                e_since = time.time()
                run = run_worker(name, engines[name]["cmd"], job_path, f"{base}.logs/round{r}-{name}.log",
                                 args.engine_timeout, sampler)
                w = sampler.window(e_since)
                run["load"] = {k: v for k, v in w.items() if k != "samples"}
                rnd["engines"][name] = run
                rnd["load"] = sampler.window(since)
                save()
            rnd["load"] = sampler.window(since)
            rnd["quiet"] = rnd["load"]["max_measuring"] is not None and rnd["load"]["max_measuring"] < threshold
            print(f"round {r + 1}: 1-min load while measuring max {rnd['load']['max_measuring']}, other processes "
                  f"~{rnd['load']['other_cores_mean_measuring']} cores → {'quiet' if rnd['quiet'] else 'LOADED'}",
                  file=sys.stderr, flush=True)
            save()
    finally:
        sampler.stop()
        result["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        result["summary"] = report.summarize(result) if result["rounds"] else None
        save()
    text = report.table(result, result["summary"])
    with open(base + ".md", "w") as f:
        f.write(text + "\n")
    report.plot(result, result["summary"], base + ".png")
    print(text)
    print(f"\nwrote {out}, {base}.md, {base}.png (logs in {base}.logs/)", file=sys.stderr)


if __name__ == "__main__":
    main()
