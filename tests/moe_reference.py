"""Test oracles: a plain dense MoE layer, small enough to trust (next to Hugging Face itself)."""

import torch
import torch.nn.functional as F


def dense_moe_reference(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                        w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Every expert over every token, masked by routing: slow, obviously right (a test oracle).

    w13 [E, 2I, H], w2 [E, H, I] for all E experts."""
    out = torch.zeros_like(hidden)
    for e in range(w13.shape[0]):
        gate, up = F.linear(hidden, w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e])                               # [n, H]
        weight = (topk_weights * (topk_ids == e)).sum(-1, keepdim=True)      # [n, 1]
        out += weight.to(y.dtype) * y
    return out
