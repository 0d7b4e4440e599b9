"""Soak test: N gRPC streams for D minutes against one `shuttle serve`, with a rank fault every F seconds.

    python bench/soak.py [--model DIR | --bench-model] [--streams 64] [--minutes 10] [--fault-every 60] \
        [--prompts 32] [--prompt-len 16 128] [--output-len 16 64] [--seed 0] [--json FILE] [shuttle serve flags]

Loopback only, bounded in time and count: the server binds 127.0.0.1, the streams stop starting requests
after --minutes, at most --minutes*60/--fault-every faults are injected, and every request has a deadline.

1. Starts `shuttle serve` (its own private Ray; 1 attention + 2 expert ranks unless flags say otherwise) on
   the model: by default a small random Mixtral (hidden 256, 4 layers, 8 experts top-2, vocab 4096, built
   once into ~/.cache/shuttle/soak-mixtral-h256-e8); waits for SERVING.
2. References: each of --prompts prompts (random token ids, seeded) alone, greedy, ignore_eos, no fault.
3. Soak: --streams client streams, each requesting the prompts in turn (stream i starts at prompt i),
   greedy, ignore_eos, each prompt's own max_tokens. Every --fault-every seconds one rank process gets a
   signal, in the order expert SIGKILL, attention SIGSTOP, expert SIGSTOP, attention SIGKILL (then again);
   the ranks are the server's descendants titled `ray::ExpertRankActor*` / `ray::AttentionRankActor*`,
   one picked at random (seeded) among those of the kind. A fault waits until the server is SERVING again.
   GetServerStatus is polled every 0.1 s (state, recoveries).
4. After --minutes: requests in flight finish, anything stopped gets SIGCONT, the server gets SIGTERM.

Reports requests served, errors (by status code), tokens compared with the references (requests whose
tokens differ, split by whether a fault happened while they ran), time to first token and inter-token
latency (p50/p99, and the longest gap: a recovery's pause), tokens/s, and per fault: detection
(injection → `STATE_RECOVERING` seen by the poller; → the server log's `rank fault` line) and recovery
(injection → `STATE_SERVING` with `recoveries` + 1; the log's `recovered in` line). Writes a JSON file
(bench/results/soak-<time>.json unless --json) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.load_test import make_trace, pct, start_server  # noqa: E402

FAULTS = [("expert", signal.SIGKILL), ("attention", signal.SIGSTOP), ("expert", signal.SIGSTOP),
          ("attention", signal.SIGKILL)]
RANK_TITLES = {"attention": "ray::AttentionRankActor", "expert": "ray::ExpertRankActor"}


def small_model() -> str:
    from bench.random_mixtral import build_random_mixtral
    return build_random_mixtral(os.path.expanduser("~/.cache/shuttle/soak-mixtral-h256-e8"), vocab_size=4096,
                                hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                                max_position_embeddings=2048)


@dataclass
class Request:
    stream: int
    prompt: int
    start: float                  # time.monotonic() when sent
    end: float = 0.0
    ttft: float | None = None
    tokens: int = 0
    error: str | None = None      # the status code's name, or None
    match: bool | None = None     # tokens == the prompt's reference (None: no reference, or an error)
    faulted: bool = False         # a fault's window (injection → recovered) overlapped the request


@dataclass
class Fault:
    n: int
    kind: str
    signal: str
    pid: int
    at: float                     # time.monotonic()
    at_wall: float                # time.time()
    recoveries_before: int
    waited_for_serving_s: float = 0.0
    detected_s: float | None = None      # → STATE_RECOVERING (or recoveries + 1) seen by the poller
    recovered_s: float | None = None     # → STATE_SERVING with recoveries + 1
    log_detected_s: float | None = None  # → the log's first `rank fault` line after the injection
    log_recovered_s: float | None = None  # → the log's `recovered in` line
    log_replaced_in_s: float | None = None  # the log's "ranks replaced (epoch N) in X s"


@dataclass
class Soak:
    requests: list[Request] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)          # inter-token latencies, all requests
    faults: list[Fault] = field(default_factory=list)
    states: list[tuple[float, str, int]] = field(default_factory=list)   # (monotonic, state, recoveries) changes
    stopped_pids: list[int] = field(default_factory=list)
    server_failed: str | None = None
    t_begin: float = 0.0          # time.monotonic() at the start
    elapsed: float = 0.0


# ---- the client side ---------------------------------------------------------------------------
async def generate(stub, pb, prompt: list[int], max_tokens: int, timeout_s: float):
    """(token ids, ttft, gaps) of one greedy stream; raises grpc.aio.AioRpcError."""
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                             sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0))
    t0 = time.monotonic()
    ids, gaps, last, ttft = [], [], None, None
    async for chunk in stub.GenerateStream(req, timeout=timeout_s):
        if chunk.token_ids:
            now = time.monotonic()
            if last is None:
                ttft = now - t0
            else:
                gaps.append(now - last)
            last = now
            ids.extend(chunk.token_ids)
    return ids, ttft, gaps


async def references(address: str, trace, timeout_s: float) -> list[list[int]]:
    import grpc
    from serving.v1 import generation_pb2 as pb
    from serving.v1 import generation_pb2_grpc as pb_grpc
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        return [(await generate(stub, pb, prompt, n, timeout_s))[0] for prompt, n in trace]


async def soak(address: str, server_pid: int, trace, refs, args) -> Soak:
    import grpc
    import psutil
    from serving.v1 import generation_pb2 as pb
    from serving.v1 import generation_pb2_grpc as pb_grpc

    out = Soak()
    t_begin = time.monotonic()
    t_stop = t_begin + args.minutes * 60
    state = {"name": "", "recoveries": 0}
    done = asyncio.Event()
    rng = random.Random(args.seed)

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)

        async def stream(i: int) -> None:
            k = i % len(trace)
            while time.monotonic() < t_stop and out.server_failed is None:
                prompt, n = trace[k]
                r = Request(stream=i, prompt=k, start=time.monotonic())
                out.requests.append(r)
                try:
                    ids, r.ttft, gaps = await generate(stub, pb, prompt, n, args.request_timeout)
                    r.tokens = len(ids)
                    r.match = ids == refs[k]
                    out.gaps.extend(gaps)
                except grpc.aio.AioRpcError as e:
                    r.error = e.code().name
                    await asyncio.sleep(0.5)      # a server that refuses everything is not spun against
                r.end = time.monotonic()
                k = (k + 1) % len(trace)

        async def poll() -> None:
            while not done.is_set():
                try:
                    s = await stub.GetServerStatus(pb.GetServerStatusRequest(), timeout=5)
                    name = pb.ServerStatus.State.Name(s.state).removeprefix("STATE_")
                    if (name, s.recoveries) != (state["name"], state["recoveries"]):
                        state.update(name=name, recoveries=s.recoveries)
                        out.states.append((time.monotonic(), name, s.recoveries))
                    if name == "FAILED":
                        out.server_failed = s.error or "failed"
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)

        def ranks(kind: str) -> list[int]:
            try:
                children = psutil.Process(server_pid).children(recursive=True)
            except psutil.Error:
                return []
            pids = []
            for p in children:
                try:
                    if p.name().startswith(RANK_TITLES[kind]):
                        pids.append(p.pid)
                except psutil.Error:
                    pass
            return pids

        async def inject() -> None:
            if args.fault_every <= 0:
                return
            n = 0
            while n < args.max_faults:
                due = t_begin + (n + 1) * args.fault_every
                if due > t_stop - args.fault_margin:
                    return
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                waited = time.monotonic()
                while state["name"] != "SERVING" and time.monotonic() < t_stop and out.server_failed is None:
                    await asyncio.sleep(0.1)      # the previous recovery first
                if time.monotonic() >= t_stop - args.fault_margin or out.server_failed is not None:
                    return
                kind, sig = FAULTS[n % len(FAULTS)]
                pids = ranks(kind)
                if not pids:
                    print(f"# fault {n + 1}: no {kind} rank process found; skipped", flush=True)
                    n += 1
                    continue
                pid = rng.choice(sorted(pids))
                f = Fault(n + 1, kind, sig.name, pid, time.monotonic(), time.time(), state["recoveries"],
                          time.monotonic() - waited)
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    continue
                if sig == signal.SIGSTOP:
                    out.stopped_pids.append(pid)
                out.faults.append(f)
                print(f"# fault {f.n} at {f.at - t_begin:.0f}s: {sig.name} {kind} rank (pid {pid})", flush=True)
                n += 1

        tasks = [asyncio.ensure_future(stream(i)) for i in range(args.streams)]
        poller = asyncio.ensure_future(poll())
        injector = asyncio.ensure_future(inject())
        await asyncio.gather(*tasks)
        injector.cancel()
        await asyncio.sleep(0.3)
        done.set()
        await poller
    out.elapsed = time.monotonic() - t_begin
    out.t_begin = t_begin
    return out


# ---- after the run: what the poller and the log say about each fault -----------------------------
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\S+) (\w+) (.*)$")


def log_events(path: str) -> list[tuple[float, str]]:
    events = []
    with open(path, errors="replace") as f:
        for line in f:
            m = LOG_TIME.match(line)
            if m:
                t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                events.append((t, m.group(4)))
    return events


def time_faults(run: Soak, log_path: str) -> None:
    events = log_events(log_path)
    for i, f in enumerate(run.faults):
        until = run.faults[i + 1].at if i + 1 < len(run.faults) else float("inf")
        for t, name, recoveries in run.states:
            if t < f.at or t >= until:
                continue
            if f.detected_s is None and (name == "RECOVERING" or recoveries > f.recoveries_before):
                f.detected_s = t - f.at
            if name == "SERVING" and recoveries > f.recoveries_before:
                f.recovered_s = t - f.at
                break
        until_wall = f.at_wall + (until - f.at)
        for t, msg in events:
            if t < f.at_wall - 0.005 or t >= until_wall:
                continue
            if f.log_detected_s is None and msg.startswith("rank fault"):
                f.log_detected_s = t - f.at_wall
            m = re.match(r"ranks replaced \(epoch \d+\) in ([\d.]+)s", msg)
            if m and f.log_replaced_in_s is None:
                f.log_replaced_in_s = float(m.group(1))
            if msg.startswith("recovered in") and f.log_recovered_s is None:
                f.log_recovered_s = t - f.at_wall
    for r in run.requests:
        for f in run.faults:
            end = f.at + (f.recovered_s if f.recovered_s is not None else 60.0)
            if r.start <= end and (r.end or float("inf")) >= f.at:
                r.faulted = True


# ---- report --------------------------------------------------------------------------------------
def summary(run: Soak) -> dict:
    ok = [r for r in run.requests if r.error is None and r.end]
    errors: dict[str, int] = {}
    for r in run.requests:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    differ = [r for r in ok if r.match is False]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    ms = lambda x: None if x != x else round(x * 1e3, 1)   # noqa: E731 (NaN → None)
    return {
        "elapsed_s": round(run.elapsed, 1),
        "requests_served": len(ok),
        "requests_during_a_fault": sum(r.faulted for r in ok),
        "errors": errors,
        "tokens": sum(r.tokens for r in ok),
        "tokens_per_s": round(sum(r.tokens for r in ok) / run.elapsed, 1),
        "tokens_differ": {"requests": len(differ), "during_a_fault": sum(r.faulted for r in differ),
                          "fault_free": sum(not r.faulted for r in differ)},
        "ttft_ms": {"p50": ms(pct(ttft, 50)), "p99": ms(pct(ttft, 99)), "max": ms(max(ttft, default=float("nan")))},
        "inter_token_ms": {"p50": ms(pct(run.gaps, 50)), "p99": ms(pct(run.gaps, 99)),
                           "max": ms(max(run.gaps, default=float("nan")))},
        "faults": len(run.faults),
        "recoveries": run.states[-1][2] if run.states else 0,
        "server_failed": run.server_failed,
    }


def s_or_dash(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def print_report(s: dict, run: Soak) -> None:
    print("| requests served | during a fault | errors | tokens | tokens/s | tokens differ (fault-free / during a fault) "
          "| TTFT p50 / p99 / max ms | inter-token p50 / p99 / max ms |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {s['requests_served']} | {s['requests_during_a_fault']} | "
          f"{sum(s['errors'].values())}{' ' + str(s['errors']) if s['errors'] else ''} | {s['tokens']} | "
          f"{s['tokens_per_s']} | {s['tokens_differ']['requests']} ({s['tokens_differ']['fault_free']} / "
          f"{s['tokens_differ']['during_a_fault']}) | {s['ttft_ms']['p50']} / {s['ttft_ms']['p99']} / {s['ttft_ms']['max']} | "
          f"{s['inter_token_ms']['p50']} / {s['inter_token_ms']['p99']} / {s['inter_token_ms']['max']} |")
    if run.faults:
        print()
        print("| fault | at s | rank | signal | detected s (status / log) | recovered s (status / log) | ranks replaced in s |")
        print("|---|---|---|---|---|---|---|")
        for f in run.faults:
            print(f"| {f.n} | {f.at - run.t_begin:.0f} | {f.kind} | {f.signal} | {s_or_dash(f.detected_s)} / "
                  f"{s_or_dash(f.log_detected_s)} | {s_or_dash(f.recovered_s)} / {s_or_dash(f.log_recovered_s)} | "
                  f"{s_or_dash(f.log_replaced_in_s)} |")
    if s["server_failed"]:
        print(f"# the server FAILED: {s['server_failed']}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint (default: a small random Mixtral, built once)")
    p.add_argument("--bench-model", action="store_true", help="serve bench/decode_bench.py's model (hidden 512, 8 layers, "
                   "16 experts, vocab 32000)")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--fault-every", type=float, default=60.0, help="seconds between faults (0: none)")
    p.add_argument("--max-faults", type=int, default=1000)
    p.add_argument("--fault-margin", type=float, default=15.0,
                   help="no fault in the last S seconds (its recovery would outlast the run)")
    p.add_argument("--prompts", type=int, default=32, help="distinct prompts (each has a fault-free reference)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=(16, 128))
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 64))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=300.0, help="each request's deadline, seconds")
    p.add_argument("--json", default=None, help="result file (default: bench/results/soak-<time>.json)")
    args, serve_flags = p.parse_known_args()

    from models.spec import load_spec
    if args.bench_model:
        if args.model:
            p.error("--bench-model and --model are exclusive")
        from bench.decode_bench import build_model
        args.model = build_model()
    model_dir = args.model or small_model()
    spec = load_spec(model_dir)
    serve_flags = ["--attention-ranks", "1", "--expert-ranks", "2", *serve_flags]   # later flags win
    trace = make_trace(args.prompts, spec.vocab_size, set(spec.eos_token_ids), tuple(args.prompt_len),
                       tuple(args.output_len), args.seed)
    machine = f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}"
    print(f"# machine: {machine}; model {os.path.basename(os.path.normpath(model_dir))} ({spec.family}, "
          f"{spec.num_layers} layers, {spec.num_experts} experts, hidden {spec.hidden_size})")
    print(f"# soak: {args.streams} streams for {args.minutes:g} min, a fault every {args.fault_every:g}s; {args.prompts} "
          f"prompts of {args.prompt_len[0]}-{args.prompt_len[1]} tokens, outputs {args.output_len[0]}-{args.output_len[1]} "
          f"(seed {args.seed}); shuttle flags: {' '.join(serve_flags)}", flush=True)

    proc, address, log_path = start_server(model_dir, serve_flags)
    run = None
    try:
        from shuttle.client import ShuttleClient
        with ShuttleClient(address) as c:
            c.wait_until_serving(600)
        t0 = time.monotonic()
        refs = asyncio.run(references(address, trace, args.request_timeout))
        print(f"# references: {len(refs)} prompts alone in {time.monotonic() - t0:.1f}s", flush=True)
        run = asyncio.run(soak(address, proc.pid, trace, refs, args))
    finally:
        for pid in (run.stopped_pids if run else []):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    time_faults(run, log_path)
    s = summary(run)
    print_report(s, run)
    path = args.json or os.path.join(REPO, "bench", "results", f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": machine, "model": os.path.basename(os.path.normpath(model_dir)), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "command": " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]), "shuttle_flags": serve_flags,
                   "streams": args.streams, "minutes": args.minutes, "fault_every_s": args.fault_every,
                   "prompts": args.prompts, "prompt_len": list(args.prompt_len), "output_len": list(args.output_len),
                   "seed": args.seed, "server_log": log_path, "server_exit": proc.returncode, "summary": s,
                   "faults": [{**asdict(f), "at": round(f.at - run.t_begin, 2)} for f in run.faults],
                   "states": [(round(t - run.t_begin, 2), name, rec) for t, name, rec in run.states],
                   # only the requests worth a look (a fault overlapped them, an error, different tokens): a
                   # 10-minute 64-stream run serves tens of thousands
                   "requests": [{**asdict(r), "start": round(r.start - run.t_begin, 2), "end": round(r.end - run.t_begin, 2)}
                                for r in run.requests if r.faulted or r.error or r.match is False]},
                  f, indent=1)
    print(f"# wrote {path}; server log {log_path}; server exit {proc.returncode}")
    return 0 if not s["server_failed"] and proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
