"""The CPU decode-attention kernel (csrc/paged_decode.cpp), built once per machine on first use.

Why a kernel: decode attention from a paged cache with torch ops has to gather every context into a
padded copy first; at 64 sequences that gather (a write, then a second read of all of it, padding
included) was most of the attention rank's time in a decode step. The kernel walks each sequence's
block table and reads each cached row once, up to that sequence's length. One layer, one thread,
64 sequences of 32-383 tokens (mean 223), 2 KV heads × 4 query heads, d 64, blocks at random places
in a 4096-block cache, on the 2-core VM we measure on: torch path 5.1-6.7 ms, kernel 3.0-3.6 ms
(results equal to ~4e-7). No library we can depend on offers this for the CPU (vLLM's and IPEX's
CPU kernels are pinned to their own torch builds), so it is ~100 lines of C++ built by
`torch.utils.cpp_extension` (which caches the build by source hash, with a lock for ranks that
start together).

The build needs a C++ compiler and takes ~35 s the first time; it is compiled for the machine it
runs on (-march=native; the build's name carries the CPU's feature flags, so a shared home
directory never hands one node another's binary). Where it cannot be built, or with
SHUTTLE_CPU_KERNELS=0, attention uses the torch path, and says so once.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading

_lock = threading.Lock()
_built: dict = {}            # "paged_decode" → the extension module, or None where it is unavailable

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "paged_decode.cpp")
# Vectorised float reductions need reassociation; these allow that and nothing that changes how
# infinities or NaNs behave (unlike -ffast-math).
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros"]


def _cpu_tag() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


def paged_decode_kernel():
    """The built extension (`.paged_decode(q, k_cache, v_cache, blocks, lens, block_size, scale)`), or None
    where it is turned off or cannot be built (then the reason is printed once)."""
    with _lock:
        if "paged_decode" in _built:
            return _built["paged_decode"]
        ext = None
        if os.environ.get("SHUTTLE_CPU_KERNELS", "1") == "0":
            pass
        else:
            try:
                from torch.utils.cpp_extension import load
                print("[shuttle] loading the CPU decode-attention kernel (built once per machine, ~35 s the first time)",
                      file=sys.stderr, flush=True)
                ext = load(name=f"shuttle_paged_decode_{_cpu_tag()}", sources=[SOURCE], extra_cflags=CFLAGS, verbose=False)
            except Exception as e:   # no compiler, no headers, ...: the torch path still works
                print(f"[shuttle] the CPU decode-attention kernel could not be built; attention uses torch ops "
                      f"(slower at large batches): {type(e).__name__}: {str(e).strip()[-500:]}", file=sys.stderr, flush=True)
        _built["paged_decode"] = ext
        return ext
