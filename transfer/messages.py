"""The M2N / N2M messages: which tokens go to which expert rank, how messages are laid out, packed
and unpacked, both directions. Backends (transfer/torch_dist.py, ...) only move the tensors made here.

Legend: T tokens in a micro-batch, k experts per token, H hidden size, R expert ranks.

For one (layer, micro-batch), attention rank a sends every expert rank e one *dispatch message*
holding, for each token with at least one of its k experts on e (once, not once per expert):
    header   int64 [HEADER_LEN]   (kind, step, layer, micro_batch, count), padded to HEADER_BYTES
    payload                        count rows: hidden [count, H] and routing [count, 2k]
                                   (k global expert ids as floats, then k weights, float32)
In float32 the payload is one tensor [count, H + 2k]; otherwise two (hidden in its dtype, then
routing in float32, since bfloat16 cannot hold expert ids exactly).
The dispatch message has a fixed size, HEADER_BYTES + the inline capacity (`Layout`): the expert
rank posts its receive before the message exists, so the size must be known in advance. When the
payload fits (count ≤ `Layout.inline_rows`, every decode batch of a normal size) it travels
inside the message: one message per (attention rank, expert rank, layer, micro-batch). A larger
payload (prefill chunks) follows as separate tensors of exact size once the expert rank has read
the count. One message instead of header-then-payload halves the latency of a dispatch: a payload
sent before its receive is posted costs gloo a rendezvous round trip.
The expert rank answers with one combine tensor [count, H]: for each token, the weighted sum of
its local experts' outputs. The attention rank adds the R answers back into the token rows
(`merge_combine`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HEADER_LEN = 5
HEADER_BYTES = 64          # the header's int64s, padded so payload views stay aligned for any dtype
INLINE_BYTES = 64 * 1024   # payload bytes carried inside a dispatch message (at least one row)
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


def dispatch_rows(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, owner: torch.Tensor,
                  num_ranks: int) -> list[tuple[torch.Tensor | None, list[torch.Tensor]]]:
    """Per expert rank: (token index, payload tensors). With one expert rank every token goes to it as it
    is: index None (all rows, in order), no row copies."""
    if num_ranks == 1:
        return [(None, pack_payload(hidden, topk_ids, topk_weights) if hidden.shape[0] else [])]
    return [(idx, pack_payload(hidden[idx], topk_ids[idx], topk_weights[idx]) if idx.numel() else [])
            for idx in route_plan(topk_ids, owner, num_ranks)]


def merge_combine(num_tokens: int, parts: list[tuple[torch.Tensor | None, torch.Tensor]], hidden_size: int,
                  dtype: torch.dtype, device) -> torch.Tensor:
    """The combine's unpacking: each expert rank's answer [n_r, H] added into its token rows → [T, H].

    parts: (token index as `dispatch_rows` gave it, answer) for every rank that got at least one token."""
    if len(parts) == 1 and parts[0][0] is None:     # the only expert rank answered for every row
        return parts[0][1].to(device)
    out = torch.zeros(num_tokens, hidden_size, dtype=dtype, device=device)
    for idx, part in parts:
        out.index_add_(0, idx, part.to(device))
    return out


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


def unpack_payload(buffers: list[torch.Tensor], hidden_size: int, top_k: int, dtype: torch.dtype | None = None,
                   device=None):
    """(hidden [n, H], topk_ids [n, k] int64, topk_weights [n, k] float32); no buffers: n = 0 (needs dtype, device)."""
    if not buffers:
        return (torch.empty(0, hidden_size, dtype=dtype, device=device),
                torch.empty(0, top_k, dtype=torch.long, device=device),
                torch.empty(0, top_k, dtype=torch.float32, device=device))
    if device is not None:
        buffers = [b.to(device) for b in buffers]
    if len(buffers) == 1:
        hidden, routing = buffers[0][:, :hidden_size], buffers[0][:, hidden_size:]
    else:
        hidden, routing = buffers
    return hidden, routing[:, :top_k].long(), routing[:, top_k:]


@dataclass(frozen=True)
class Layout:
    """Sizes of the fixed dispatch message for one model (both sides build the same one)."""

    hidden_size: int
    top_k: int
    dtype: torch.dtype
    inline_bytes: int = INLINE_BYTES

    @property
    def row_bytes(self) -> int:
        return self.hidden_size * self.dtype.itemsize + 2 * self.top_k * 4

    @property
    def inline_rows(self) -> int:
        return max(1, self.inline_bytes // self.row_bytes)

    @property
    def message_bytes(self) -> int:
        return HEADER_BYTES + self.inline_rows * self.row_bytes

    def empty_message(self, device) -> torch.Tensor:
        return torch.empty(self.message_bytes, dtype=torch.uint8, device=device)

    def pack(self, header: Header, payload: list[torch.Tensor], device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the dispatch message, payload tensors still to send separately: [] when inline)."""
        msg = self.empty_message(device)           # bytes past the header and payload are never read
        msg[:HEADER_LEN * 8] = header.to_tensor().to(device).view(torch.uint8)
        if header.count > self.inline_rows:
            return msg, [t.to(device) for t in payload]
        at = HEADER_BYTES
        for t in payload:
            raw = t.contiguous().view(-1).view(torch.uint8)
            msg[at:at + raw.numel()] = raw.to(device)
            at += raw.numel()
        return msg, []

    def header(self, msg: torch.Tensor) -> Header:
        return Header.from_tensor(msg[:HEADER_LEN * 8].view(torch.int64).cpu())

    def inline_payload(self, msg: torch.Tensor, count: int) -> list[torch.Tensor]:
        """Views of the payload inside a received message (count ≤ inline_rows), as payload_buffers lays it out."""
        out, at = [], HEADER_BYTES
        for b in payload_buffers(count, self.hidden_size, self.top_k, self.dtype, "meta"):
            n = b.numel() * b.element_size()
            out.append(msg[at:at + n].view(b.dtype).view(b.shape))
            at += n
        return out
