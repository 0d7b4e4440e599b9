"""Paged attention against a plain per-sequence reference: the CPU decode kernel and the torch path.

Sequences get block tables scattered over the cache (never in order), lengths that end inside a
block, on a block boundary, and at one token; a step mixes decode tokens with a prefill chunk.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from attention_node.paged_attention import AttentionBatch, PagedKVCache, paged_attention
from models import cpu_kernels
from scheduler.messages import SeqChunk


def _reference(q, ks, vs):
    """q [n, h, d] against one sequence's contiguous k/v [C, g, d], causal at the end → [n, h, d] (float64)."""
    n, h, d = q.shape
    g = ks.shape[1]
    k = ks.double().repeat_interleave(h // g, dim=1).transpose(0, 1)          # [h, C, d]
    v = vs.double().repeat_interleave(h // g, dim=1).transpose(0, 1)
    C = k.shape[1]
    scores = q.double().transpose(0, 1) @ k.transpose(1, 2) / math.sqrt(d)    # [h, n, C]
    causal = torch.arange(C)[None, :] <= (C - n + torch.arange(n))[:, None]
    scores = scores.masked_fill(~causal, float("-inf"))
    return (torch.softmax(scores, -1) @ v).transpose(0, 1)                     # [n, h, d]


def _run(decode_kernel: bool, g: int, r: int, d: int, block_size: int, seed: int = 0, dtype=torch.float32,
         row_context: int = 0):
    """One layer-1 step over a cache that already holds every sequence's earlier tokens."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_blocks, layers = 96, 2
    cache = PagedKVCache(layers, num_blocks, block_size, g, d, dtype, torch.device("cpu"), decode_kernel=decode_kernel)
    cache.k.normal_()
    cache.v.normal_()
    free = list(range(1, num_blocks))            # block 0 pads decode tables: keep it out of real use
    rng.shuffle(free)
    # (context length after this step, new tokens this step): decode rows of many lengths, one prefill chunk
    shapes = [(1, 1), (5, 1), (block_size, 1), (block_size + 1, 1), (3 * block_size - 2, 1), (40, 1), (23, 7), (9, 1)]
    chunks, spans = [], []
    row = 0
    for i, (ctx, n) in enumerate(shapes):
        table = [free.pop() for _ in range(-(-ctx // block_size))]
        chunks.append(SeqChunk(f"r{i}", [7] * n, ctx - n, table, True))
        spans.append((row, n, ctx, table))
        row += n
    T = row
    q, k, v = torch.randn(T, g * r, d, dtype=dtype), torch.randn(T, g, d, dtype=dtype), torch.randn(T, g, d, dtype=dtype)
    batch = AttentionBatch.build(chunks, block_size, torch.device("cpu"), row_context)
    if row_context:         # the prefill chunk's 7 rows went to the decode kernel too
        assert batch.decode_rows.numel() == T and not batch.prefills
    out = paged_attention(q, k, v, cache, 1, batch)
    for start, n, ctx, table in spans:
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(ctx)])
        ks, vs = cache.k[1][:, slots].transpose(0, 1), cache.v[1][:, slots].transpose(0, 1)     # [C, g, d] (new rows written)
        assert torch.equal(ks[-n:], k[start:start + n]) and torch.equal(vs[-n:], v[start:start + n])
        want = _reference(q[start:start + n], ks, vs)
        tol = 2e-5 if dtype == torch.float32 else 2e-2        # bfloat16: the output's own rounding (2^-8)
        assert torch.allclose(out[start:start + n].double(), want, atol=tol, rtol=tol), \
            f"sequence of {ctx} tokens ({n} new): max error {(out[start:start + n].double() - want).abs().max():.2e}"
    return cache


@pytest.mark.parametrize("decode_kernel", [True, False], ids=["kernel", "torch"])
# Head dims 32/64/128/256 take the kernel's register passes (queries four at a time: r = 6 leaves two over;
# d = 256 one query per V pass), d = 16 its scalar loops.
@pytest.mark.parametrize("g,r,d,block_size", [(2, 4, 64, 16), (4, 1, 32, 4), (1, 3, 16, 8), (2, 6, 64, 4), (1, 8, 128, 16),
                                              (1, 2, 256, 8)])
def test_paged_attention_matches_reference(decode_kernel, g, r, d, block_size):
    cache = _run(decode_kernel, g, r, d, block_size)
    assert (cache.decode_kernel is not None) == decode_kernel


@pytest.mark.parametrize("decode_kernel", [True, False], ids=["kernel", "torch"])
def test_bfloat16_cache_matches_reference(decode_kernel):
    """bfloat16 caches: the kernel widens each cached value to float32 as it reads it, sums in float32."""
    cache = _run(decode_kernel, 2, 4, 64, 16, dtype=torch.bfloat16)
    assert (cache.decode_kernel is not None) == decode_kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g,r,d,block_size", [(2, 4, 64, 16), (1, 3, 16, 8)])
def test_prefill_rows_through_the_decode_kernel_match_reference(g, r, d, block_size, dtype):
    """A prefill chunk whose context fits `row_context` is attended row by row (each row a decode
    token whose context ends at itself): the same causal attention as the block path."""
    _run(True, g, r, d, block_size, dtype=dtype, row_context=64)


def test_cpu_caches_use_the_kernel_unless_turned_off(monkeypatch):
    """The kernel builds here (CI machines have a compiler) for float32 and bfloat16 caches;
    SHUTTLE_CPU_KERNELS=0 leaves torch ops, other dtypes never take it."""
    cpu = torch.device("cpu")
    assert PagedKVCache(1, 4, 4, 1, 8, torch.float32, cpu).decode_kernel is not None
    assert PagedKVCache(1, 4, 4, 1, 8, torch.bfloat16, cpu).decode_kernel is not None
    assert PagedKVCache(1, 4, 4, 1, 8, torch.float16, cpu).decode_kernel is None
    monkeypatch.setattr(cpu_kernels, "_built", {})
    monkeypatch.setenv("SHUTTLE_CPU_KERNELS", "0")
    assert PagedKVCache(1, 4, 4, 1, 8, torch.float32, cpu).decode_kernel is None


def test_kernel_rejects_inputs_it_cannot_read():
    ext = cpu_kernels.cpu_kernels()
    q, kc = torch.randn(2, 1, 1, 8), torch.randn(1, 16, 8)
    blocks, lens = torch.tensor([[0], [1]]), torch.tensor([3, 4])
    with pytest.raises(RuntimeError, match="float32 or bfloat16 only"):
        ext.paged_decode(q.double(), kc.double(), kc.double(), blocks, lens, 8, 1.0)
    with pytest.raises(RuntimeError, match="the same for q and both caches"):
        ext.paged_decode(q, kc.bfloat16(), kc.bfloat16(), blocks, lens, 8, 1.0)
    with pytest.raises(RuntimeError, match="outside its block table"):
        ext.paged_decode(q, kc, kc, blocks, torch.tensor([3, 9]), 8, 1.0)
    with pytest.raises(RuntimeError, match="block id out of range"):
        ext.paged_decode(q, kc, kc, torch.tensor([[0], [2]]), lens, 8, 1.0)



def test_a_build_killed_midway_does_not_block_the_next():
    """torch's build lock is a file that a build killed midway leaves behind; the next load must not wait on
    it forever (it would hang every rank of every later deployment on this machine)."""
    import os
    import subprocess
    import sys
    assert cpu_kernels.cpu_kernels() is not None                      # built (or found) in this process
    stale = os.path.join(cpu_kernels.build_directory(), "lock")
    open(stale, "w").close()
    try:
        code = "from models.cpu_kernels import cpu_kernels; import sys; sys.exit(0 if cpu_kernels() is not None else 1)"
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert not os.path.exists(stale)
    finally:
        if os.path.exists(stale):
            os.remove(stale)


@pytest.mark.parametrize("n,C", [(128, 128), (150, 150), (300, 700), (513, 520)])
def test_long_prefill_chunks_in_blocks_match_reference(n, C):
    """Chunks longer than PREFILL_BLOCK go in blocks of queries, each against only the keys it can see;
    with earlier context (C > n) the causal edge is offset by C − n."""
    from attention_node.paged_attention import PREFILL_BLOCK, _grouped_prefill
    assert PREFILL_BLOCK == 128             # the cases above sit on both sides of it
    torch.manual_seed(n + C)
    g, r, d = 2, 4, 32
    q, ks, vs = torch.randn(n, g * r, d), torch.randn(C, g, d), torch.randn(C, g, d)
    mask = torch.arange(C)[None, :] <= (C - n + torch.arange(n))[:, None]
    bias = torch.zeros(n, C).masked_fill_(~mask, float("-inf"))
    got = _grouped_prefill(q, ks.transpose(0, 1).contiguous(), vs.transpose(0, 1).contiguous(), bias)
    assert torch.allclose(got.double(), _reference(q, ks, vs), atol=2e-5, rtol=1e-4)
