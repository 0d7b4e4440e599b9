"""Split one attention rank's step batch into micro-batches of about equal work.

Work of a chunk ≈ the tokens it pushes through every GEMM plus the KV it reads in attention:
    work = len(token_ids) + context_len / KV_READ_PER_TOKEN
(a decode token at context 1024 costs about as much as 1 + 1024/64 = 17 fresh tokens). Chunks are
placed largest first on the lightest micro-batch (LPT), then kept in their original order inside
each micro-batch so that outputs are deterministic.
"""

from __future__ import annotations

from scheduler.messages import SeqChunk

KV_READ_PER_TOKEN = 64.0


def chunk_work(chunk: SeqChunk) -> float:
    return len(chunk.token_ids) + chunk.context_len / KV_READ_PER_TOKEN


def split_micro_batches(chunks: list[SeqChunk], m: int) -> list[list[SeqChunk]]:
    """Exactly `m` micro-batches (trailing ones may be empty when there are fewer chunks than m)."""
    loads = [0.0] * m
    groups: list[list[int]] = [[] for _ in range(m)]
    for i in sorted(range(len(chunks)), key=lambda i: -chunk_work(chunks[i])):
        g = min(range(m), key=lambda g: (loads[g], g))
        groups[g].append(i)
        loads[g] += chunk_work(chunks[i])
    groups.sort(key=lambda g: (not g, g[0] if g else 0))  # non-empty first, in request order
    return [[chunks[i] for i in sorted(g)] for g in groups]


def step_micro_batches(chunk_counts: list[int], m: int) -> int:
    """Micro-batches this step: `m`, but no more than the busiest rank has chunks (at least 1)."""
    return max(1, min(m, max(chunk_counts, default=0)))
