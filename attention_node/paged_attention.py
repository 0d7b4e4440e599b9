"""Paged KV cache and attention over a batch that mixes prefill chunks and decode tokens.

Legend: T tokens in the micro-batch, B decode sequences, L longest decode context, h query heads,
g KV heads, r = h / g query heads per KV head, d head dim, S slots (= KV blocks × block size).

The cache is one flat slot array per layer and KV head ([g, S, d], head-major): slot =
block_table[pos // block_size] · block_size + pos % block_size. Head-major means a gather of whole
blocks lands as [g, B, L, d] with every (head, sequence) context contiguous, which is what a batched
matrix product wants. On the CPU (float32 or bfloat16), decode sequences (one new token each) are
attended by a small C++ kernel that walks each block table and reads every cached row once, up to
that sequence's length (models/cpu_kernels.py). Elsewhere (GPUs, no compiler) they are attended in one batched
call over their contexts gathered whole blocks at a time (padded to the longest, masked): the r query
heads of a KV head are that head's r query rows, so each K/V row is read once (SDPA's grouped-query
path over the slot-major [S, g, d] layout this replaced read it r times, strided). Each prefill chunk
is attended on its own with a causal mask that starts at the chunk's offset (earlier chunks are read
back from the cache): on the CPU by a C++ kernel in one pass over its keys (`prefill_attention`,
flash-style), else with the same grouped rows as decode as matrix products (SDPA on GPUs).
What each choice measured: docs/performance.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from scheduler.messages import SeqChunk


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, decode_kernel: bool = True):
        shape = (num_layers, num_kv_heads, num_blocks * block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)   # [layers, g, S, d]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.workspace = _Workspace()
        # CPU decode attends straight from the cache (models/cpu_kernels.py); None: torch ops
        self.decode_kernel = None
        if decode_kernel and torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16):
            from models.cpu_kernels import cpu_kernels
            self.decode_kernel = cpu_kernels()

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


@dataclass
class AttentionBatch:
    """Index tensors for one micro-batch, built once per step and reused by every layer."""

    positions: torch.Tensor                # [T]
    slots: torch.Tensor                    # [T] where each new token's K/V goes
    decode_rows: torch.Tensor              # [B] token rows of decode sequences
    decode_blocks: torch.Tensor            # [B, nb] KV blocks of each decode context (padded with block 0)
    decode_lens: torch.Tensor              # [B] context length of each decode sequence
    prefills: list["PrefillChunk"]         # chunks attended as causal blocks
    sample_rows: torch.Tensor              # [N] rows whose logits are sampled
    block_size: int = 16
    sample_tables: list = field(default_factory=list)  # [N] KV blocks of each sampled row's context
    sample_lens: list = field(default_factory=list)    # [N] context length of each sampled row (it ends at the row)

    @functools.cached_property
    def sampled(self) -> "AttentionBatch":
        """The sampled rows alone, each a decode token whose context ends at itself: what the last
        layer attends once its K/V rows are written (`paged_attention(..., sampled_only=True)`). Made
        on first use: steps whose every row is sampled never need it."""
        device = self.sample_rows.device
        rows = torch.arange(self.sample_rows.numel(), dtype=torch.long, device=device)
        return AttentionBatch(positions=self.positions.index_select(0, self.sample_rows), slots=self.slots.index_select(0, self.sample_rows),
                              decode_rows=rows, decode_blocks=_padded(self.sample_tables).to(device),
                              decode_lens=torch.tensor(self.sample_lens, dtype=torch.long, device=device),
                              prefills=[], sample_rows=rows, block_size=self.block_size)

    @functools.cached_property
    def decode_bias(self) -> torch.Tensor:
        """[1, B, 1, nb · block_size]: 0 where the key is real, -inf on padding. Only the torch decode
        path masks padding (the kernel reads each context to its length): made on first use, not per step."""
        B, nb = self.decode_blocks.shape
        lens = self.decode_lens.to("cpu")
        pad = torch.arange(nb * self.block_size)[None, :] >= lens[:, None]                # [B, nb · bs]
        bias = torch.zeros(pad.shape, dtype=torch.float32).masked_fill_(pad, float("-inf"))
        return bias[None, :, None, :].to(self.decode_lens.device)

    @classmethod
    def build(cls, chunks: list[SeqChunk], block_size: int, device: torch.device,
              row_context: int = 0) -> "AttentionBatch":
        """`row_context`: prefill chunks whose context (earlier tokens included) is at most this many
        tokens are attended row by row, each row as a decode token whose context ends at itself
        (causal), by the decode kernel that reads the cache in place; longer ones, and every chunk
        where it is 0 (no kernel), as one causal block of matrix products."""
        positions, slots, decode_rows, decode_tables, decode_lens, prefills, sample_rows = [], [], [], [], [], [], []
        sample_tables, sample_lens = [], []
        row = 0
        for c in chunks:
            n = len(c.token_ids)
            if n == 1 and c.start_pos == c.context_len - 1 or c.context_len <= row_context:   # rows as decode tokens
                table = c.block_table
                for pos in range(c.start_pos, c.start_pos + n):
                    positions.append(pos)
                    slots.append(table[pos // block_size] * block_size + pos % block_size)
                    decode_rows.append(row + pos - c.start_pos)
                    decode_tables.append(table[:-(-(pos + 1) // block_size)])
                    decode_lens.append(pos + 1)
            else:
                table = torch.tensor(c.block_table, dtype=torch.long)
                ctx_pos = torch.arange(c.context_len)
                ctx_slots = table[ctx_pos // block_size] * block_size + ctx_pos % block_size   # [C]
                positions += range(c.start_pos, c.context_len)
                slots += ctx_slots[c.start_pos:].tolist()
                prefills.append(PrefillChunk(row, n, ctx_slots.to(device)))
            if c.sample:
                last = c.start_pos + n          # the sampled row's context: every token up to it
                sample_rows.append(row + n - 1)
                sample_tables.append(c.block_table[:-(-last // block_size)])
                sample_lens.append(last)
            row += n
        longs = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)   # noqa: E731
        return cls(positions=longs(positions), slots=longs(slots), decode_rows=longs(decode_rows),
                   decode_blocks=_padded(decode_tables).to(device), decode_lens=longs(decode_lens), prefills=prefills,
                   sample_rows=longs(sample_rows), block_size=block_size, sample_tables=sample_tables,
                   sample_lens=sample_lens)


def _padded(tables: list) -> torch.Tensor:
    """Block tables → [n, most blocks], padded with block 0 (read only up to each context's length)."""
    most = max(map(len, tables), default=0)
    return torch.tensor([list(b) + [0] * (most - len(b)) for b in tables], dtype=torch.long).view(len(tables), most)


@dataclass
class PrefillChunk:
    """A chunk attended as one causal block: its rows [start, start + n) of the micro-batch, the cache
    slots of its whole context [C] (earlier chunks' tokens, then its own)."""

    start: int
    n: int
    ctx_slots: torch.Tensor

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """[n, C] bool: query i sees keys up to its own position (SDPA's mask, GPUs). Made on first use:
        the CPU kernel masks by position itself."""
        C = self.ctx_slots.numel()
        ctx_pos = torch.arange(C, device=self.ctx_slots.device)
        return ctx_pos[None, :] <= ctx_pos[C - self.n:, None]

    @functools.cached_property
    def bias(self) -> torch.Tensor:
        """[n, C] float32: 0 where the key is seen, -inf elsewhere (the torch path on the CPU)."""
        return torch.zeros(self.mask.shape, dtype=torch.float32, device=self.mask.device).masked_fill_(~self.mask, float("-inf"))


class _Workspace:
    """Reused gather buffers: a fresh multi-MB tensor per layer costs more in page faults than the
    gather itself on the CPU."""

    def __init__(self):
        self.buffers: dict = {}    # (which, dtype, device) → flat buffer, viewed as each gather needs

    def gather(self, which: str, cache: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
        """cache rows at `index` along `dim` → a view (index's shape in place of that dim), valid until the next
        gather of `which`."""
        shape = list(cache.shape)
        shape[dim] = index.numel()
        need = int(torch.Size(shape).numel())
        key = (which, cache.dtype, cache.device)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < need:
            buf = torch.empty(max(need, 1 << 18), dtype=cache.dtype, device=cache.device)
            self.buffers[key] = buf
        out = buf[:need].view(shape)
        torch.index_select(cache, dim, index.reshape(-1), out=out)
        return out.view(*shape[:dim], *index.shape, *shape[dim + 1:])


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: PagedKVCache, layer: int,
                    batch: AttentionBatch, sampled_only: bool = False) -> torch.Tensor:
    """q [T, h, d], k/v [T, g, d] for the new tokens → attention output [T, h, d]. `sampled_only`:
    every row's K/V is written, but only the sampled rows are attended, as decode tokens → [N, h, d]
    (the last layer: nothing reads the other rows' outputs)."""
    k_cache, v_cache = cache.k[layer], cache.v[layer]           # [g, S, d]
    if cache.decode_kernel is not None:        # one copy loop (index_copy_: ~40 µs a layer at 64 tokens)
        cache.decode_kernel.kv_write(k_cache, v_cache, batch.slots, k, v)
    else:
        k_cache.index_copy_(1, batch.slots, k.transpose(0, 1))
        v_cache.index_copy_(1, batch.slots, v.transpose(0, 1))
    if sampled_only:
        q, batch = q.index_select(0, batch.sample_rows), batch.sampled
        if not q.shape[0]:      # a chunk that samples nothing (not its prompt's last)
            return q
    g, d, h = k_cache.shape[0], k_cache.shape[2], q.shape[1]
    B = batch.decode_rows.numel()
    only_decode = B == q.shape[0]        # every row a decode token: no gather of q, no scatter of the output
    out = None if only_decode else torch.empty_like(q)
    if B:
        qd = (q if only_decode else q[batch.decode_rows]).reshape(B, g, -1, d)    # [B, g, r, d]
        if cache.decode_kernel is not None:
            od = cache.decode_kernel.paged_decode(qd.contiguous(), k_cache, v_cache, batch.decode_blocks,
                                                  batch.decode_lens, cache.block_size, d ** -0.5)
        else:
            od = _gathered_decode(qd, k_cache, v_cache, cache, batch)
        if only_decode:
            return od.reshape(B, -1, d)
        out[batch.decode_rows] = od.reshape(B, -1, d)
    for chunk in batch.prefills:
        start, n, ctx_slots = chunk.start, chunk.n, chunk.ctx_slots
        kp = cache.workspace.gather("k", k_cache, ctx_slots, 1)   # [g, C, d]
        vp = cache.workspace.gather("v", v_cache, ctx_slots, 1)
        ext = cache.decode_kernel
        if ext is not None and ext.has_prefill_attention() and h % g == 0 and d % 16 == 0:
            # causal attention in one pass over the keys (flash-style, float32 sums): 1.2-1.8x the
            # matrix products below at 512 tokens (docs/performance.md)
            out[start:start + n] = ext.prefill_attention(q[start:start + n].contiguous(), kp.contiguous(),
                                                         vp.contiguous(), d ** -0.5)
        elif q.device.type == "cpu":
            out[start:start + n] = _grouped_prefill(q[start:start + n], kp, vp, chunk.bias)
        else:   # fused kernels on GPUs
            op = F.scaled_dot_product_attention(q[start:start + n].transpose(0, 1), kp, vp, attn_mask=chunk.mask, enable_gqa=True)
            out[start:start + n] = op.transpose(0, 1)
    return out


def _gathered_decode(qd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache: PagedKVCache,
                     batch: AttentionBatch) -> torch.Tensor:
    """Decode attention with torch ops: qd [B, g, r, d] against contexts gathered whole blocks at a time
    (padded to the longest, masked) → [B, g, r, d]."""
    B, g, _, d = qd.shape
    L = batch.decode_blocks.shape[1] * cache.block_size
    by_block = (g, cache.num_blocks, cache.block_size, d)
    # Whole blocks (block_size contiguous slots each), not single slots: 16× fewer rows to find.
    kd = cache.workspace.gather("k", k_cache.view(by_block), batch.decode_blocks, 1).view(g, B, L, d)
    vd = cache.workspace.gather("v", v_cache.view(by_block), batch.decode_blocks, 1).view(g, B, L, d)
    scores = torch.matmul(qd.transpose(0, 1), kd.transpose(2, 3)).mul_(d ** -0.5).add_(batch.decode_bias)   # [g, B, r, L]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(vd.dtype)
    return torch.matmul(probs, vd).transpose(0, 1)                             # [B, g, r, d]


def _grouped_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """One prefill chunk, q [n, h, d] against its context k/v [g, C, d] with bias [n, C] → [n, h, d].

    As in decode, the r query heads of a KV head are rows of one matrix product ([g, r·n, d] · [g, d, C]).
    On the CPU this beats SDPA, which takes its unfused path for a masked, grouped-query chunk. Long
    chunks go in blocks of PREFILL_BLOCK queries, each against the keys it can see (C − n + its last
    query): a causal chunk needs only about half the products, and a block's scores stay in cache
    (512 tokens, one layer: 11 ms in one block, 3.1 in blocks of 128; docs/performance.md)."""
    n, h, d = q.shape
    g, C = k.shape[0], k.shape[1]
    r = h // g
    if n <= PREFILL_BLOCK:
        return _grouped_block(q.view(n, g, r, d).permute(1, 0, 2, 3), k, v, bias).permute(1, 0, 2, 3).reshape(n, h, d)
    out = torch.empty_like(q)
    qg = q.view(n, g, r, d).permute(1, 0, 2, 3)                                # [g, n, r, d]
    for s in range(0, n, PREFILL_BLOCK):
        e = min(n, s + PREFILL_BLOCK)
        seen = C - n + e
        o = _grouped_block(qg[:, s:e], k[:, :seen], v[:, :seen], bias[s:e, :seen])
        out[s:e] = o.permute(1, 0, 2, 3).reshape(e - s, h, d)
    return out


# Session 12, one layer of a 512-token chunk (8 / 2 heads, d 64, 2 threads): blocks of 256 queries
# 4.2 ms in float32, 7.6 in bfloat16; of 128: 3.1 and 2.6; of 64: 3.3 and 3.3 (docs/performance.md).
PREFILL_BLOCK = 128


def _grouped_block(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """qg [g, m, r, d] (m queries, r heads per KV head) against k/v [g, C, d] with bias [m, C] → [g, m, r, d]."""
    g, m, r, d = qg.shape
    C = k.shape[1]
    rows = qg.reshape(g, m * r, d)                                             # row (query, head)
    scores = torch.matmul(rows, k.transpose(1, 2)).mul_(d ** -0.5).view(g, m, r, C).add_(bias[:, None, :])
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs.view(g, m * r, C), v).view(g, m, r, d)
