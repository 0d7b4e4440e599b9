"""Starting or joining Ray, with the environment a rank process needs.

On a machine with no cluster, Shuttle starts a private local Ray: loopback only
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps it, and its clients, on 127.0.0.1), no dashboard,
no token-auth prompt (Ray 2.60 turns token auth on by default; a private loopback Ray has no
other users). Rank processes use the loopback interface for gloo.

A private Ray dies with the process that started it, even one killed with SIGKILL (`fate_share`).
Ray itself gives its head processes (GCS, raylet, dashboard, monitors) `PR_SET_PDEATHSIG`, but not
what the raylet starts: its agents (`ray::DashboardAgent`, `ray::RuntimeEnvAgent`) notice the
raylet's death at once, then wait about a minute on the dead GCS before they exit; a rank's own
children (a compiler building the CPU kernels) are orphaned. So before the first private Ray
starts, this process starts a *reaper*: a tiny stdlib-only Python process, the leader of a process
group of its own, whose stdin is a pipe whose only writer is this process. Ray's head processes
are put into the reaper's group as they start (the raylet's agents inherit it), and they start
with `SHUTTLE_FATE_TOKEN` in their environment, which the raylet passes on to the workers it starts
(rank processes: they lead process groups of their own) and they to their children. When the pipe
closes (this process ended: exit, crash, SIGKILL) the reaper SIGKILLs every process of its group
and every process that carries the token, scanning /proc again until none is left (at most 10 s),
then exits. A process group is invisible to the terminal: Ctrl-C still reaches the foreground
group (this process), never the Ray daemons, which Ray has always shielded from SIGINT. A joined
cluster (`address`) is left alone: there Ray itself ends a dead driver's actors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import subprocess
import sys

import ray
from ray._private import utils as ray_utils

LOCAL_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "GLOO_SOCKET_IFNAME": "lo",
    "RAY_USAGE_STATS_ENABLED": "0",
    # libgomp's threads spin ~300k iterations after each parallel region by default. An attention
    # rank and an expert rank on one machine take turns, and the idle one's spinning threads steal
    # the busy one's cores. Since attention ranks run decode layers on one thread there
    # (cluster/threads.py), the expert rank's threads are the spinners that matter, and a longer spin
    # than libgomp's short alternative saves them a futex wake-up per GEMM (docs/performance.md).
    "GOMP_SPINCOUNT": "10000",
    # Ray starts worker processes (our ranks) at niceness 15, so the head, the gRPC server, Ray's own
    # daemons and any client on the machine preempt the ranks on every step. Ranks are the service.
    "RAY_worker_niceness": "0",
    # glibc returns large freed blocks (>= 128 KB, a threshold that only grows after such a free) to the
    # kernel, so every step's fresh multi-MB tensors (logits, an expert layer's gathered rows and
    # activations) page-fault again on first touch. Kept in the heap instead (32 MB is glibc's
    # largest mmap threshold on 64-bit; the heap top is returned past 256 MB free; docs/performance.md).
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(256 << 20),
}


def local_ray_env() -> dict[str, str]:
    """Environment variables for rank processes (the user's own settings win)."""
    return {k: os.environ.get(k, v) for k, v in LOCAL_ENV.items()}


STARTUP_ATTEMPTS = 3
# Ray's own start-up timeouts (seen on a busy 2-core VM): the raylet's, and the GCS port file's.
_STARTUP_TIMEOUTS = ("timed out during startup", "Timed out waiting for file")
log = logging.getLogger("shuttle.ray")


def start_ray(address: str | None = None) -> bool:
    """Connect to Ray; start a private local one when `address` is None. True if we started it."""
    if ray.is_initialized():
        return False
    for k, v in local_ray_env().items():
        os.environ.setdefault(k, v)
    if address:
        ray.init(address=address, log_to_driver=True, _node_ip_address=node_ip_toward(address))
        return False
    reaper = fate_share()
    for attempt in range(STARTUP_ATTEMPTS):
        try:
            with _fate_shared(reaper):
                ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True,
                         configure_logging=False, _node_ip_address="127.0.0.1")
            return True
        except Exception as e:  # Ray raises bare Exceptions when its raylet or GCS misses a fixed start window
            if not any(m in str(e) for m in _STARTUP_TIMEOUTS) or attempt == STARTUP_ATTEMPTS - 1:
                raise
            log.warning("Ray's node did not start within its window (machine busy?): %s; trying again",
                        str(e).splitlines()[0][:200])
            ray.shutdown()
    return True


def node_ip_toward(address: str) -> str | None:
    """This machine's address on the cluster's network: the source of its route to the cluster's GCS.
    Passed to ray.init explicitly, since with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the private-Ray
    setting) Ray would call this node 127.0.0.1 and find no raylet there. None: Ray finds no cluster
    at `address` and ray.init says so."""
    from ray._private.services import canonicalize_bootstrap_address

    from cluster.inventory import route_to
    gcs = canonicalize_bootstrap_address(address)
    return route_to(gcs.rsplit(":", 1)[0])[1] if gcs else None


# ---- fate sharing: a private Ray dies with this process (see the module docstring) -------------
FATE_TOKEN_ENV = "SHUTTLE_FATE_TOKEN"
REAP_DEADLINE_S = 10.0

# The reaper's whole program (stdlib only, so it starts in ~20 ms and holds nothing of Ray's).
# argv: the token, this process's pid, the deadline. Signals that reach a terminal's or a service's processes
# (SIGINT, SIGTERM, SIGHUP) are ignored: the reaper outlives its parent by design, and acts on EOF.
_REAPER = r"""
import os, signal, sys, time
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
token, parent = ("%s=%s" % ("SHUTTLE_FATE_TOKEN", sys.argv[1])).encode(), int(sys.argv[2])
me = os.getpid()
while sys.stdin.buffer.read(4096):   # nobody writes: read() returns b"" when the last writer is gone
    pass

def doomed():
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in (me, parent):
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if fields[0] == b"Z":
                continue
            if int(fields[2]) == me:
                yield int(name)
                continue
            with open("/proc/%s/environ" % name, "rb") as f:
                if token in f.read().split(b"\0"):
                    yield int(name)
        except (OSError, ValueError, IndexError):
            pass

deadline = time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    left = list(doomed())
    if not left:
        break
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    time.sleep(0.05)
"""

_reaper: subprocess.Popen | None = None
_reaper_token = ""
_reaper_pipe: int | None = None     # the write end; its close (at this process's end) is the reaper's cue


def fate_share() -> tuple[int, str] | None:
    """Start this process's reaper (once; again if it died): its process group and token, or None
    where there is no /proc (not Linux; there Ray's own mechanisms are all there is)."""
    global _reaper, _reaper_pipe, _reaper_token
    if not sys.platform.startswith("linux") or not os.path.isdir("/proc"):
        return None
    if _reaper is not None and _reaper.poll() is None:
        return _reaper.pid, _reaper_token
    token = f"{os.getpid()}-{secrets.token_hex(8)}"
    read, write = os.pipe()            # non-inheritable: no other child holds the write end open
    try:
        _reaper = subprocess.Popen([sys.executable, "-I", "-S", "-c", _REAPER, token, str(os.getpid()),
                                    str(REAP_DEADLINE_S)],
                                   stdin=read, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
                                   **_new_process_group())
    except OSError as e:
        os.close(write)
        log.warning("could not start the reaper (a private Ray may outlive a killed server): %s", e)
        return None
    finally:
        os.close(read)
    if _reaper_pipe is not None:
        os.close(_reaper_pipe)
    _reaper_pipe, _reaper_token = write, token
    return _reaper.pid, token


def _new_process_group() -> dict:
    """Popen arguments for a child that leads a process group of its own, in this session (Ray's
    processes can join only a group of their own session: not start_new_session)."""
    return {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


@contextlib.contextmanager
def _fate_shared(reaper: tuple[int, str] | None):
    """While Ray starts its head processes: each one joins the reaper's process group before it
    execs, and inherits the token. The hook is the function Ray calls in those children to set
    PR_SET_PDEATHSIG; with a Ray that has no such function they keep this process's group (and the
    agents linger as before; tests/integration/test_serve_signals.py fails). Only these processes
    get the token: not what this process starts later."""
    pdeathsig = getattr(ray_utils, "set_kill_on_parent_death_linux", None)
    if reaper is None or pdeathsig is None:
        yield
        return
    group, token = reaper

    def pdeathsig_and_group():          # in the child, between fork and exec
        pdeathsig()
        try:
            os.setpgid(0, group)
        except OSError:
            pass
    before = os.environ.get(FATE_TOKEN_ENV)
    os.environ[FATE_TOKEN_ENV] = token
    ray_utils.set_kill_on_parent_death_linux = pdeathsig_and_group
    try:
        yield
    finally:
        ray_utils.set_kill_on_parent_death_linux = pdeathsig
        if before is None:
            os.environ.pop(FATE_TOKEN_ENV, None)
        else:
            os.environ[FATE_TOKEN_ENV] = before
