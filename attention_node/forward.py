"""The attention rank's forward pass, written as one program per micro-batch with yield points.

Legend: T tokens in the micro-batch, H hidden, h/g query/KV heads, d head dim, k experts per token,
E experts, V vocab, N sampled rows.

A program runs its micro-batch through every layer; at each MoE layer it launches the dispatch of
its routed tokens and *yields*, so the executor can run the next micro-batch's attention while the
expert ranks work on this one; when resumed it waits for the combine and goes on. `run_pingpong`
is that executor: round-robin over the programs, so with m micro-batches the dispatch order on
every attention rank is (layer 0, mb 0), (layer 0, mb 1), …, (layer 1, mb 0), … — the order the
expert ranks consume. With m = 1 the same code runs without overlap.

On the CPU, a micro-batch of decode rows runs each MoE layer's attention block (norms, QKV, rotary,
cache write, attention, O, residual, router top-k) as one `decode_block` kernel call: the same
kernels in the same order as the Python path below, which stays the reference (and runs prefill
rows, q/k norms, dense layers, GPUs).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Generator

import torch
import torch.nn.functional as F

from attention_node.paged_attention import AttentionBatch, PagedKVCache, paged_attention
from attention_node.trace import StepTrace
from attention_node.weights import AttentionWeights, LayerWeights
from models.cpu_kernels import for_tensor
from models.linear import Linear
from models.spec import ModelSpec
from transfer.base import AttentionEndpoint, InlineExperts


# The LM head runs over at most this many rows at once (bounded [rows, V] logits).
LM_HEAD_ROWS = 128


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if (kernels := for_tensor(x)) is not None:     # one call (F.rms_norm is six kernels), rounded as below
        return kernels.rms_norm(x, weight, eps)
    if x.dtype == torch.float32:    # one fused op, bit-identical to the steps below in float32
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def swiglu(x: torch.Tensor, up: Linear, down: Linear) -> torch.Tensor:
    """x [n, H], up: [2I, H] (gate rows, then up rows), down: [H, I] → [n, H]."""
    gate, up_ = up(x).chunk(2, dim=-1)
    return down(F.silu(gate) * up_)


def shared_expert(x: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
    """Qwen2-MoE's shared expert, gated: sigmoid(gate(x)) · SwiGLU(x)."""
    return torch.sigmoid(lw.shared_gate(x)) * swiglu(x, lw.ffn_up, lw.ffn_down)


def route(x: torch.Tensor, router: Linear, top_k: int, renormalize: bool):
    """Softmax top-k routing, as the HF families do it: (ids [T, k], weights [T, k] in x's dtype).
    On the CPU one kernel call (`route_topk`, what decode_block runs too), else torch's ops."""
    logits = router(x)
    kernels = for_tensor(logits)
    if kernels is not None:
        return kernels.route_topk(logits, x, top_k, renormalize)
    probs = torch.softmax(logits.float(), dim=-1)                   # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights.to(x.dtype)


class RotaryTable:
    """cos/sin [max_len, d] computed once (float32, then cast), indexed by position."""

    def __init__(self, head_dim: int, theta: float, max_len: int, dtype: torch.dtype, device: torch.device):
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(dtype).to(device)
        self.sin = emb.sin().to(dtype).to(device)

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [T, 1, d] at these positions: looked up once per step, used by every layer."""
        return self.cos.index_select(0, positions).unsqueeze(1), self.sin.index_select(0, positions).unsqueeze(1)

    @staticmethod
    def apply(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [T, heads, d] → a new [T, heads, d]."""
        cos, sin = cos_sin
        if (kernels := for_tensor(x)) is not None:      # one call instead of six ops, rounded as below
            return kernels.rotary(x, cos, sin)
        return x * cos + rotate_half(x) * sin


class AttentionForward:
    # the last layer runs only the sampled rows past their K/V (`program`); False: every row, as the
    # layers before it (a reference for tests and benchmarks)
    sampled_last_layer = True

    def __init__(self, spec: ModelSpec, weights: AttentionWeights, cache: PagedKVCache, rotary: RotaryTable,
                 transfer: AttentionEndpoint):
        self.spec = spec
        self.w = weights
        self.cache = cache
        self.rotary = rotary
        self.transfer = transfer
        self.in_block = [_fits_block(lw) for lw in weights.layers]     # layers `decode_block` covers
        self._fused = None           # the whole-step decode kernel: None until asked, False where it does not apply
        # greedy picks (greedy_steps' and greedy_pick's): screened (the head read as int8, `exact_rows`
        # of it computed exactly) or by the whole head
        self.head_picks: Counter = Counter()

    def attention(self, layer: int, lw: LayerWeights, x: torch.Tensor, batch: AttentionBatch,
                  cos_sin: tuple[torch.Tensor, torch.Tensor], sampled_only: bool = False) -> torch.Tensor:
        """x [T, H] → attention output [T, H]; `sampled_only`: K/V of every row go to the cache, the
        output is the sampled rows' alone, [N, H]."""
        s = self.spec
        T, h, g, d = x.shape[0], s.num_heads, s.num_kv_heads, s.head_dim
        qkv = lw.qkv(x)                                                  # [T, (h + 2g)·d]
        v = qkv[:, (h + g) * d:].view(T, g, d)
        if lw.q_norm is None:      # q and k rotated in one pass: [T, h + g, d]
            q, k = self.rotary.apply(qkv[:, :(h + g) * d].view(T, h + g, d), cos_sin).split([h, g], dim=1)
        else:
            q = rms_norm(qkv[:, :h * d].view(T, h, d), lw.q_norm, s.rms_norm_eps)
            k = rms_norm(qkv[:, h * d:(h + g) * d].view(T, g, d), lw.k_norm, s.rms_norm_eps)
            q, k = self.rotary.apply(q, cos_sin), self.rotary.apply(k, cos_sin)
        o = paged_attention(q, k, v, self.cache, layer, batch, sampled_only)     # [T or N, h, d]
        return lw.o(o.reshape(o.shape[0], h * d))

    def program(self, step: int, micro_batch: int, input_ids: torch.Tensor, batch: AttentionBatch,
                trace: StepTrace) -> Generator[None, None, torch.Tensor]:
        """One micro-batch through every layer; returns the final hidden states [N, H] of its sampled rows."""
        s = self.spec
        trace.compute_starts(micro_batch)
        h = self.w.embed.index_select(0, input_ids)                       # [T, H]
        cos_sin = self.rotary.at(batch.positions)
        block = self._block_kernel(h, batch)
        # An expert side that answers on this thread (a colocated node's one inline expert rank) is
        # called directly: nothing to overlap or wait for, so no handle, no yield, no spans (unless
        # the plan asks for a timeline, which keeps the dispatch/wait path and its spans).
        direct = None if trace.keep_spans else self.transfer.inline_experts()
        fused = self._decode_layers(block, direct) if block is not None and direct is not None else None
        if fused is not None:       # every layer, with its experts, in one kernel call
            counts, times = fused.run(h, cos_sin[0], cos_sin[1], batch.slots, batch.decode_blocks, batch.decode_lens,
                                      micro_batch % 2 == 1)
            direct.record_decode(step, micro_batch, h.shape[0], counts, times)
            return rms_norm(h.index_select(0, batch.sample_rows), self.w.final_norm, s.rms_norm_eps)
        # The last layer's output is read only at the sampled rows (its K/V, which later tokens read, is
        # every row's): there, from the attention on, only they go on (N of T rows; none for a chunk that
        # is not its prompt's last). A 512-token prompt: an eighth of its expert work (docs/performance.md).
        # Not where every row is a decode token (a short prompt's rows, decode steps): those keep the
        # one-call paths, whose outputs every deployment reproduces bit for bit.
        trim = self.sampled_last_layer and block is None and batch.sample_rows.numel() < h.shape[0]
        last = len(self.w.layers) - 1 if trim else -1
        for layer, lw in enumerate(self.w.layers):
            if block is not None and self.in_block[layer]:      # h += attention, x = norm(h), routing: one call
                x, ids, weights = self.decode_block(block, layer, lw, h, batch, cos_sin)
            else:
                if layer == last:
                    a = self.attention(layer, lw, rms_norm(h, lw.input_norm, s.rms_norm_eps), batch, cos_sin, True)
                    h = h.index_select(0, batch.sample_rows).add_(a)
                elif h.shape[0]:    # h is this program's own tensor (the embedding lookup made it): added in place
                    h.add_(self.attention(layer, lw, rms_norm(h, lw.input_norm, s.rms_norm_eps), batch, cos_sin))
                x = rms_norm(h, lw.post_norm, s.rms_norm_eps)
                if lw.router is None:
                    h.add_(swiglu(x, lw.ffn_up, lw.ffn_down))
                    continue
                ids, weights = route(x, lw.router, s.top_k, s.norm_topk_prob)
            if direct is not None:
                routed = direct.compute_rows(step, layer, micro_batch, x, ids, weights.float())
                h.add_(routed if lw.ffn_up is None else routed + shared_expert(x, lw))
                continue
            if lw.ffn_up is None:
                trace.compute_ends(layer, micro_batch)
            handle = self.transfer.dispatch_launch(step, layer, micro_batch, x, ids, weights)
            shared = None
            if lw.ffn_up is not None:       # the shared expert overlaps the round trip (and its span covers it)
                shared = shared_expert(x, lw)
                trace.compute_ends(layer, micro_batch)
            yield
            routed = trace.wait(layer, micro_batch, lambda: self.transfer.combine_wait(handle))
            h.add_(routed if shared is None else routed + shared)
        trace.compute_ends(-1, micro_batch)
        if last < 0:
            h = h.index_select(0, batch.sample_rows)
        return rms_norm(h, self.w.final_norm, s.rms_norm_eps)

    def _block_kernel(self, h: torch.Tensor, batch: AttentionBatch):
        """The CPU kernels where this micro-batch's MoE layers can run their attention block as one call
        (`decode_block`: every row a decode token, the decode attention kernel in use), else None."""
        if not h.shape[0] or batch.decode_rows.numel() != h.shape[0] or self.cache.decode_kernel is None:
            return None
        return for_tensor(h)

    def _decode_layers(self, kernels, experts: InlineExperts):
        """`DecodeLayers` (models/csrc/layer.cpp: every layer of a decode step and its expert layer in
        one call) where every layer is an MoE layer that `decode_block` covers, none has a shared
        expert, and the inline expert rank's weights are panel-packed; else None. Built on first use
        (it holds this rank's weights and cache layers and the expert rank's panels)."""
        if self._fused is None:
            self._fused = False
            layers, s = self.w.layers, self.spec
            args = experts.decode_kernel_args() if all(self.in_block) and all(lw.ffn_up is None for lw in layers) else None
            if args is not None and len(args[1]) == len(layers):
                local, up, down = args
                routers = [lw.router for lw in layers]
                self._fused = kernels.DecodeLayers(
                    [lw.input_norm for lw in layers], [lw.post_norm for lw in layers], s.rms_norm_eps,
                    [lw.qkv.panels for lw in layers], [lw.qkv.bias for lw in layers], s.num_heads, s.num_kv_heads,
                    [self.cache.k[i] for i in range(len(layers))], [self.cache.v[i] for i in range(len(layers))],
                    self.cache.block_size, s.head_dim ** -0.5, [lw.o.panels for lw in layers], [lw.o.bias for lw in layers],
                    [r.panels for r in routers], [r.weight for r in routers], [r.bias for r in routers], s.top_k,
                    s.norm_topk_prob, local, up, down)
        return self._fused or None

    def greedy_steps(self, step: int, tokens: list[int], start_pos: list[int], tables: list[list[int]], steps: int,
                     threads: tuple[int, int]):
        """Up to `steps` greedy decode steps of one micro-batch of decode rows (row b: input token
        tokens[b] at start_pos[b], block table tables[b] covering every step) in one kernel call,
        `DecodeLayers.greedy_steps`: per step every layer, the final norm, the LM head and the greedy
        pick, without Python in between; threads: (for the layers, for the LM head), 0 leaving torch's
        setting alone. Where the whole-step kernel does not apply, or the LM head is not panel-packed
        or has a bias: None. Else (tokens [done][B], logits [B, V] float32 of the step that stopped the
        loop before its pick (a row without a finite maximum: the sampler's rule) or None, seconds in
        the layers, seconds in the LM head and pick); the expert rank records each step's counters as
        a per-step call would."""
        lm = self.w.lm_head
        direct = self.transfer.inline_experts()
        if direct is None or lm.panels is None or lm.bias is not None or self.cache.decode_kernel is None:
            return None
        kernels = for_tensor(self.w.embed)
        fused = self._decode_layers(kernels, direct) if kernels is not None else None
        bs = self.cache.block_size
        if fused is None or any((p + steps - 1) // bs >= len(t) for p, t in zip(start_pos, tables)):
            return None      # (a table that does not cover every step: the passes raise on it, as before)
        width = max(map(len, tables))
        table = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.long)
        t0 = time.time()
        screen = self.w.lm_screen or (None, None)
        out, stopped, counts, times, phases, exact = fused.greedy_steps(
            torch.tensor(tokens, dtype=torch.long), torch.tensor(start_pos, dtype=torch.long), table, steps, self.w.embed,
            self.rotary.cos, self.rotary.sin, self.w.final_norm, lm.panels, *screen, LM_HEAD_ROWS, *threads)
        self._count_picks(exact.tolist())
        for k in range(counts.shape[0]):
            direct.record_decode(step, 0, len(tokens), counts[k], times[k])
        ends = phases.tolist()
        layers = sum(a - b for (a, _), b in zip(ends, [t0] + [e for _, e in ends[:-1]]))
        return out.tolist(), stopped, layers, sum(e - a for a, e in ends)

    def decode_block(self, kernels, layer: int, lw: LayerWeights, h: torch.Tensor, batch: AttentionBatch,
                     cos_sin: tuple[torch.Tensor, torch.Tensor]):
        """h += attention(norm(h)) in place; returns (x = post-norm(h), ids, weights): what `attention`,
        `rms_norm` and `route` compute, bit for bit, in one kernel call (models/csrc/layer.cpp)."""
        s, r = self.spec, lw.router
        return kernels.decode_block(
            h, lw.input_norm, lw.post_norm, s.rms_norm_eps, lw.qkv.panels, lw.qkv.bias, s.num_heads, s.num_kv_heads,
            cos_sin[0], cos_sin[1], self.cache.k[layer], self.cache.v[layer], batch.slots, batch.decode_blocks,
            batch.decode_lens, self.cache.block_size, s.head_dim ** -0.5, lw.o.panels, lw.o.bias, r.panels, r.weight,
            r.bias, s.top_k, s.norm_topk_prob)

    def greedy_pick(self, hidden: torch.Tensor) -> list[int] | None:
        """The greedy tokens of final hidden rows [N, H] through the LM head's int8 screen
        (`screened_greedy`, models/csrc/screen.cpp): the tokens the whole head's logits give, the head
        read mostly as int8. None where it does not apply (no screen, a head with a bias, more rows than
        the screen takes) or cannot decide (a non-finite row, too many rows left to compute): the
        caller computes the logits."""
        lm, screen = self.w.lm_head, self.w.lm_screen
        kernels = for_tensor(hidden) if screen is not None and lm.bias is None else None
        if kernels is None or not 0 < hidden.shape[0] <= kernels.head_screen_rows(hidden.dtype == torch.bfloat16):
            return None
        _, ids, exact = kernels.screened_greedy(hidden.contiguous(), lm.panels, *screen, screen[1].shape[1] // 8)
        self._count_picks([exact])
        return ids.tolist() if exact else None

    def _count_picks(self, exact_rows: list[int]) -> None:
        """Per greedy pick, the head rows computed exactly (0: the screen gave up, the whole head ran)."""
        for n in exact_rows:
            self.head_picks["screened" if n else "whole_head"] += 1
            self.head_picks["exact_rows"] += n

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] → logits [N, V] float32."""
        return self.w.lm_head(hidden).float()


def _fits_block(lw: LayerWeights) -> bool:
    """Whether `decode_block` covers this layer: an MoE layer without q/k norms whose projections are
    panel-packed and whose router is panel-packed or plain (not oneDNN-packed)."""
    r = lw.router
    return (r is not None and lw.q_norm is None and lw.qkv.panels is not None and lw.o.panels is not None
            and (r.panels is not None or r.weight is not None))


def run_pingpong(programs: list[Generator]) -> list[torch.Tensor]:
    """Round-robin executor over micro-batch programs; returns each program's result."""
    results: list = [None] * len(programs)
    live = list(range(len(programs)))
    while live:
        still = []
        for i in live:
            try:
                next(programs[i])
                still.append(i)
            except StopIteration as done:
                results[i] = done.value
        live = still
    return results
