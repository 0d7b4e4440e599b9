"""Process checks for tests that must leave nothing running: only processes the test itself
started are looked at, and gone means gone (a zombie whose exit is not yet collected runs nothing)."""

from __future__ import annotations

import time

import psutil


def running(p: psutil.Process) -> bool:
    try:                          # is_running() also tells a reused pid from the process itself
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def still_running(procs, within_s: float) -> list[str]:
    """Polls until none of `procs` (a list, or a dict process → what it was) runs, for at most
    `within_s`; returns those still running then, as 'pid what'."""
    deadline = time.monotonic() + within_s
    while True:
        alive = [p for p in procs if running(p)]
        if not alive or time.monotonic() > deadline:
            what = (lambda p: procs[p]) if isinstance(procs, dict) else (lambda p: " ".join(cmdline(p)))
            return [f"{p.pid} {what(p)[:120]}" for p in alive]
        time.sleep(0.2)
