"""Starting or joining Ray, with the environment a rank process needs.

On a machine with no cluster, Shuttle starts a private local Ray: loopback only
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps it, and its clients, on 127.0.0.1), no dashboard,
no token-auth prompt (Ray 2.60 turns token auth on by default; a private loopback Ray has no
other users). Rank processes use the loopback interface for gloo.
"""

from __future__ import annotations

import logging
import os

import ray

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
    for attempt in range(STARTUP_ATTEMPTS):
        try:
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
