"""The M2N message plan: which tokens go to which expert rank, and how messages are laid out.

Legend: T tokens in a micro-batch, k experts per token, H hidden size, R expert ranks.

For one (layer, micro-batch), attention rank a sends every expert rank e one header and, when e
owns at least one of a token's k experts, that token once (not once per expert):
    header  int64 [HEADER_LEN]   (kind, step, layer, micro_batch, count)
    payload                       count rows: hidden [count, H] and routing [count, 2k]
                                  (k global expert ids as floats, then k weights, float32)
In float32 the payload is one tensor [count, H + 2k]; otherwise two (hidden in its dtype, then
routing in float32, since bfloat16 cannot hold expert ids exactly). A zero count sends no payload.
The expert rank answers with one combine tensor [count, H]: for each token, the weighted sum of
its local experts' outputs. The attention rank adds the R answers back into the token rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HEADER_LEN = 5
KIND_DATA = 0
KIND_SHUTDOWN = 1


@dataclass(frozen=True)
class Header:
    kind: int
    step: int
    layer: int
    micro_batch: int
    count: int

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor([self.kind, self.step, self.layer, self.micro_batch, self.count], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "Header":
        return cls(*[int(x) for x in t.tolist()])


def route_plan(topk_ids: torch.Tensor, owner: torch.Tensor, num_ranks: int) -> list[torch.Tensor]:
    """Token indices per expert rank: tokens with at least one of their experts on that rank.

    topk_ids [T, k] global expert ids; owner [E] expert → rank. Returns R index tensors (sorted).
    """
    ranks = owner[topk_ids]                                          # [T, k]
    hit = torch.zeros(topk_ids.shape[0], num_ranks, dtype=torch.bool, device=topk_ids.device)
    hit.scatter_(1, ranks, True)                                     # [T, R]
    return [hit[:, r].nonzero().flatten() for r in range(num_ranks)]


def pack_payload(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> list[torch.Tensor]:
    """Payload tensors for `count` rows (see the module docstring)."""
    routing = torch.cat([topk_ids.float(), topk_weights.float()], dim=1)  # [n, 2k]
    if hidden.dtype == torch.float32:
        return [torch.cat([hidden, routing], dim=1).contiguous()]
    return [hidden.contiguous(), routing.contiguous()]


def payload_buffers(count: int, hidden_size: int, top_k: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
    if dtype == torch.float32:
        return [torch.empty(count, hidden_size + 2 * top_k, dtype=dtype, device=device)]
    return [torch.empty(count, hidden_size, dtype=dtype, device=device),
            torch.empty(count, 2 * top_k, dtype=torch.float32, device=device)]


def unpack_payload(buffers: list[torch.Tensor], hidden_size: int, top_k: int):
    """(hidden [n, H], topk_ids [n, k] int64, topk_weights [n, k] float32)."""
    if len(buffers) == 1:
        hidden, routing = buffers[0][:, :hidden_size], buffers[0][:, hidden_size:]
    else:
        hidden, routing = buffers
    return hidden, routing[:, :top_k].long(), routing[:, top_k:]
