"""Grouped expert FFN with dynamic gating: sort by expert, count, one GEMM per expert.

Legend: n tokens received, k experts per token, p = (token, expert) pairs that hit a local expert,
H hidden, I expert width, X local experts.

No capacity factor, no padding, no dropped tokens: expert e multiplies exactly the c_e rows routed
to it (c_e may be 0, and then it does nothing). Each token's local outputs are scaled by their
routing weights and summed per token (`index_add_`); the attention rank adds the expert ranks'
partial sums.

Where every expert weight of a layer is packed for Shuttle's CPU panel kernel (models/linear.py), the
whole layer is one kernel call (`moe_ffn`: grouping by expert, every expert's up projection in one
parallel region, SiLU·up, every down projection, the weighted sum per token), instead of ~20 torch
ops; elsewhere (GPUs, bfloat16, no compiler) a loop over the experts with torch ops. It relies on the
rank's malloc settings (cluster/ray_env.py): without them multi-MB activations page-fault on every
call. Measurements: docs/performance.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.checkpoint import CheckpointReader, read_expert
from models.cpu_kernels import cpu_kernels
from models.linear import Linear
from models.spec import ModelSpec


class ExpertShard:
    """The experts one expert rank owns, for every MoE layer."""

    def __init__(self, spec: ModelSpec, experts: list[int], w13: dict[int, torch.Tensor], w2: dict[int, torch.Tensor]):
        """w13: layer → [X, 2I, H] (gate rows, then up rows); w2: layer → [X, H, I]."""
        self.spec = spec
        self.experts = list(experts)
        self.up = {layer: [Linear(w) for w in t] for layer, t in w13.items()}     # layer → X × [2I, H]
        self.down = {layer: [Linear(w) for w in t] for layer, t in w2.items()}    # layer → X × [H, I]
        local = torch.full((spec.num_experts,), -1, dtype=torch.long)
        local[torch.tensor(self.experts, dtype=torch.long)] = torch.arange(len(self.experts))
        self.local_index = local                # [E] global expert id → local index, -1 if not ours
        self.last_counts: list[int] = []        # rows per local expert in the last forward (for stats)
        self.grouped = {layer: _grouped(self.up[layer], self.down[layer]) for layer in self.up}   # layer → kernel args

    @classmethod
    def load(cls, spec: ModelSpec, reader: CheckpointReader, experts: list[int], dtype: torch.dtype,
             device: torch.device) -> "ExpertShard":
        w13, w2 = {}, {}
        for layer in spec.moe_layer_ids:
            pairs = [read_expert(spec, reader, layer, e, dtype) for e in experts]
            w13[layer] = [a.to(device) for a, _ in pairs]
            w2[layer] = [b.to(device) for _, b in pairs]
        shard = cls(spec, experts, w13, w2)
        shard.local_index = shard.local_index.to(device)
        return shard

    def forward(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                reverse: bool = False) -> torch.Tensor:
        """hidden [n, H], topk_ids [n, k] global ids, topk_weights [n, k] → local weighted sum [n, H].

        `reverse` walks the experts last to first: consecutive micro-batches of one layer alternate
        direction, so the next one starts on the experts whose weights are still in the cache."""
        n, k = topk_ids.shape
        grouped = self.grouped.get(layer)
        if grouped and n:               # the whole layer in one kernel call (models/csrc: moe_ffn)
            kernels, up_panels, down_panels = grouped
            out, counts = kernels.moe_ffn(hidden.contiguous(), self.local_index[topk_ids], topk_weights.float().contiguous(),
                                          up_panels, down_panels, reverse)
            self.last_counts = counts.tolist()
            return out
        out = torch.zeros_like(hidden)
        if n == 0:
            self.last_counts = []
            return out
        local = self.local_index[topk_ids].flatten()                      # [n·k]
        hit = (local >= 0).nonzero().flatten()                           # [p] pair indices
        order = torch.argsort(local[hit], stable=True)
        pairs = hit[order]                                               # [p] pairs grouped by expert
        experts = local[pairs]
        tokens = pairs // k                                              # [p]
        counts = torch.bincount(experts, minlength=len(self.experts)).tolist()
        self.last_counts = counts
        x = hidden[tokens]                                               # [p, H]
        y = self._looped_ffn(layer, x, counts, reverse)
        y *= topk_weights.flatten()[pairs].to(y.dtype)[:, None]
        return out.index_add_(0, tokens, y)

    def _looped_ffn(self, layer: int, x: torch.Tensor, counts: list[int], reverse: bool) -> torch.Tensor:
        """The same, one expert at a time (weights the panel kernel does not hold) → [p, H]."""
        y = torch.empty_like(x)
        up, down = self.up[layer], self.down[layer]
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        order = range(len(counts) - 1, -1, -1) if reverse else range(len(counts))
        for e in order:
            a, b = starts[e], starts[e + 1]
            if b > a:
                gate, up_ = up[e](x[a:b]).chunk(2, dim=-1)                         # [c, I] each
                y[a:b] = down[e](F.silu(gate) * up_)                               # [c, H]
        return y


def _grouped(up: list[Linear], down: list[Linear]):
    """(kernels, up panels, down panels) where every expert matrix of a layer is panel-packed, else None."""
    if not up or any(lin.panels is None for lin in up + down):
        return None
    return cpu_kernels(), [lin.panels for lin in up], [lin.panels for lin in down]
