"""Memory in 2 MB pages for the packed weights the CPU kernels stream.

A decode step streams every packed weight once (0.4-0.8 GB on the bench model). In 4 KB pages that
is a TLB miss every 4 KB, and the hardware prefetchers stop at every page boundary. Backed by 2 MB
transparent huge pages instead, the expert layer of a batch-64 decode step took 40 ms instead of
48 (float32) and 15.5 instead of 20.5 (bfloat16), 8 layers on the 2-core bench VM; batch 1 gained
~10% (docs/performance.md).

Most Linux machines run transparent huge pages in `madvise` mode (only regions that ask get them), so
weights are placed in anonymous mappings that ask: 64 MB chunks, 2 MB-aligned, handed out in order,
64-byte aligned. Where the OS offers no huge pages, the same memory is used in small pages (nothing
fails). SHUTTLE_HUGEPAGES=0 turns it off (plain torch.empty, for A/B measurements).
A chunk is unmapped when the last tensor placed in it is freed.
"""

from __future__ import annotations

import math
import mmap
import os
import threading

import torch

HUGE = 2 << 20
CHUNK = 64 << 20
MIN_BYTES = 256 << 10        # smaller tensors stay on torch's allocator
_ALIGN = 64

_lock = threading.Lock()
_chunk: dict = {}            # "base": uint8 tensor over the aligned part of the current mapping, "used": bytes


def enabled() -> bool:
    return os.environ.get("SHUTTLE_HUGEPAGES", "1") != "0" and hasattr(mmap, "MADV_HUGEPAGE")


def _new_chunk(nbytes: int) -> None:
    size = max(CHUNK, -(-nbytes // HUGE) * HUGE)
    mm = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(mm, dtype=torch.uint8)         # keeps `mm` alive as long as any view of it lives
    skip = -raw.data_ptr() % HUGE
    try:
        mm.madvise(mmap.MADV_HUGEPAGE, skip, size)         # before the first touch: faults then take 2 MB pages
    except OSError:
        pass                                               # no THP in this kernel: small pages, same memory
    _chunk["base"], _chunk["used"] = raw[skip:skip + size], 0


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor, in huge-page-backed memory when it is big enough to matter."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < MIN_BYTES or not enabled():
        return torch.empty(shape, dtype=dtype)
    with _lock:
        if not _chunk or _chunk["used"] + nbytes > _chunk["base"].numel():
            _new_chunk(nbytes)
        start = _chunk["used"]
        _chunk["used"] = -(-(start + nbytes) // _ALIGN) * _ALIGN
        return _chunk["base"][start:start + nbytes].view(dtype).view(shape)
