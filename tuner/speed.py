"""The machine's speed right now: a short fixed workload, timed, to put measurements minutes apart on one scale.

A shared VM's speed wanders (docs/tuning.md, "The speed probe"). A profile is taken over minutes
and a deployment is measured minutes later; without a common scale the prediction error is mostly
the machine's drift. `speed_probe()` times a fixed mix of the kernels a decode step spends its time
in (small-row GEMMs against a weight matrix, a KV-style row gather, a softmax) on one thread. The
profile records it around every sample and stores stage times at its reference speed (the median
probe); a prediction for a later moment is scaled by probe_then / reference (`Profile.speed_factor`).
It removes most of the slow drift and little of the sub-second jitter.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import time

import torch


@functools.cache
def _inputs() -> dict:
    """The workload's tensors, made once per process (the probe's own allocations would be timed otherwise)."""
    g = torch.Generator().manual_seed(0)
    return dict(w=torch.randn(256, 768, generator=g), x=torch.randn(32, 256, generator=g),
                pool=torch.randn(4096, 16, 128, generator=g), idx=torch.randint(0, 4096, (1024,), generator=g),
                out=torch.empty(1024, 16, 128))


def _once(s: dict) -> float:
    t0 = time.perf_counter()
    for _ in range(20):
        torch.matmul(s["x"], s["w"])
    for _ in range(4):
        torch.index_select(s["pool"], 0, s["idx"], out=s["out"])
    torch.softmax(s["out"].view(-1, 128), -1)
    return time.perf_counter() - t0


def speed_probe(repeats: int = 7) -> float:
    """Median seconds of the fixed workload on one thread (lower is faster)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    s = _inputs()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _once(s)                                   # warm: caches, first-touch of the output
        times = sorted(_once(s) for _ in range(repeats))
    finally:
        torch.set_num_threads(threads)
    return times[repeats // 2]


def _probe_child(barrier, out, repeats: int) -> None:
    barrier.wait()
    out.put(speed_probe(repeats))


def concurrent_slowdown(processes: int, repeats: int = 15) -> dict:
    """How much `processes` single-threaded ranks computing at once slow each other down on this host.

    Times the probe alone, then in `processes` processes started together (a barrier lines them up);
    returns {"alone_s", "together_s", "slowdown"} with slowdown = (together / alone - 1) / (processes - 1):
    the simulator's `overlap_slowdown` (each of k ranks computing at once runs 1 + s·(k-1) times slower),
    measured directly instead of fitted. Needs processes ≤ the cores: beyond that the simulator's core
    sharing already accounts for the wait."""
    if processes < 2:
        raise ValueError(f"need at least 2 processes to measure contention, got {processes}")
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_probe_child, args=(barrier, out, repeats), daemon=True) for _ in range(processes)]
    for p in procs:
        p.start()
    try:
        together = [out.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    alone = speed_probe(repeats)
    mean = sum(together) / len(together)
    return {"alone_s": alone, "together_s": mean, "slowdown": max(0.0, (mean / alone - 1) / (processes - 1))}
