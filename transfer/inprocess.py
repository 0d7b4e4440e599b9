"""Transfer backend: every rank in one process (a colocated node), tensors handed over through queues.

The ranks are threads of one process; `DataPlane.local` is their `Hub` (one queue per attention
rank → expert rank pair and one back). Dispatch routes and packs exactly as the torch.distributed
backend does (`transfer/messages.py`), but the messages are tensors passed by reference: no copy
through a socket, no process switch, no rendezvous. Expert ranks are still driven by the messages
(their serve loop runs on its own thread), so the rest of the system cannot tell this backend from
another. Expert ranks that compute inline (a colocated node's) get their rows as the attention
rank's own tensors, not packed; where there is one, it is offered to the attention rank to call
directly (`inline_experts`). Deadlines are the same as elsewhere: a wait on a peer thread that never answers raises
TransferError after `timeout_s`; an idle expert rank's wait for the next message is open-ended.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from transfer.base import (ATTENTION, AttentionEndpoint, DataPlane, ExpertBatch, ExpertEndpoint, InlineExperts,
                           TransferError)
from transfer.messages import KIND_DATA, KIND_SHUTDOWN, Header, merge_combine, pack_payload, route_plan, unpack_payload


class Hub:
    """The queues between A attention ranks and R expert ranks of one process.

    `inline[e]`, when set, is expert rank e's compute (ExpertBatch → one output per attention rank),
    called on the dispatching thread instead of queuing the message for a serving thread: with one
    attention rank and one micro-batch the sides take turns anyway, and a thread switch per layer
    costs more than it overlaps. `expert[e]`, when given too, is the expert rank itself
    (`transfer.base.InlineExperts`): its `compute_rows` takes one attention rank's rows as tensors,
    with no ExpertBatch or list around them."""

    def __init__(self, num_attention: int, num_expert: int):
        self.to_expert = [[queue.SimpleQueue() for _ in range(num_attention)] for _ in range(num_expert)]     # [e][a]
        self.to_attention = [[queue.SimpleQueue() for _ in range(num_expert)] for _ in range(num_attention)]  # [a][e]
        self.inline: list[Callable[[ExpertBatch], list[torch.Tensor]] | None] = [None] * num_expert
        self.expert: list[InlineExperts | None] = [None] * num_expert

    def serve_inline(self, expert_rank: int, compute: Callable[[ExpertBatch], list[torch.Tensor]],
                     expert: InlineExperts | None = None) -> None:
        if len(self.to_attention) != 1:
            raise ValueError("inline expert ranks need a single attention rank (each dispatch is then a whole message)")
        self.inline[expert_rank] = compute
        self.expert[expert_rank] = expert


def connect(plane: DataPlane, role: str, rank: int, device: torch.device) -> AttentionEndpoint | ExpertEndpoint:
    if not isinstance(plane.local, Hub):
        raise ValueError("the inprocess backend needs DataPlane.local = transfer.inprocess.Hub(A, R), "
                         "shared by every rank of the process")
    return (InProcessAttention if role == ATTENTION else InProcessExpert)(plane, rank, device)


def _get(q: queue.SimpleQueue, timeout_s: float | None, what: str):
    try:
        return q.get(timeout=timeout_s)
    except queue.Empty:
        raise TransferError(f"{what} (timeout {timeout_s:g}s)") from None


@dataclass
class _Dispatch:
    header: Header
    parts: list = field(default_factory=list)       # (expert rank, token index or None, inline answer or None)


class InProcessAttention(AttentionEndpoint):
    def __init__(self, plane: DataPlane, rank: int, device: torch.device):
        self.rank, self.plane, self.device = rank, plane, device
        self.owner = torch.tensor(plane.owner, dtype=torch.long, device=device)
        self.hub: Hub = plane.local

    def dispatch_launch(self, step, layer, micro_batch, hidden, topk_ids, topk_weights) -> _Dispatch:
        """Each expert rank's rows (with one expert rank: the whole batch as it is). An inline rank
        computes them now, on this thread, from the tensors by reference (no wire packing, no queue:
        at batch 1 those cost ~0.1 ms a layer, more than the attention block's kernels), and its
        answer waits in the handle; a rank with a serving thread gets the message the wire would
        carry, an empty one too."""
        T = hidden.shape[0]
        handle = _Dispatch(Header(KIND_DATA, step, layer, micro_batch, T))
        weights = topk_weights.float()            # what the wire carries (float32 routing weights)
        routes = [None] if self.plane.num_expert == 1 else route_plan(topk_ids, self.owner, self.plane.num_expert)
        for e, idx in enumerate(routes):
            n = T if idx is None else idx.numel()
            rows = (hidden, topk_ids, weights) if idx is None else (hidden[idx], topk_ids[idx], weights[idx])
            if self.hub.inline[e] is None:
                self.hub.to_expert[e][self.rank].put((Header(KIND_DATA, step, layer, micro_batch, n),
                                                      pack_payload(*rows) if n else []))
                if n:
                    handle.parts.append((e, idx, None))
            elif n:
                expert = self.hub.expert[e]
                answer = (expert.compute_rows(step, layer, micro_batch, *rows) if expert is not None else
                          self.hub.inline[e](ExpertBatch(step, layer, micro_batch, *([t] for t in rows)))[0])
                handle.parts.append((e, idx, answer))
        return handle

    def inline_experts(self) -> InlineExperts | None:
        """The one inline expert rank, where it was given as itself (a colocated node's usual shape)."""
        return self.hub.expert[0] if self.plane.num_expert == 1 else None

    def combine_wait(self, handle: _Dispatch) -> torch.Tensor:
        h = handle.header
        where = f"step {h.step}, layer {h.layer}, micro-batch {h.micro_batch}"
        parts = [(idx, answer if answer is not None else
                  _get(self.hub.to_attention[self.rank][e], self.plane.timeout_s,
                       f"attention rank {self.rank}: no combine from expert rank {e} ({where})"))
                 for e, idx, answer in handle.parts]
        return merge_combine(h.count, parts, self.plane.hidden_size, self.plane.torch_dtype, self.device)

    def close(self) -> None:
        for e in range(self.plane.num_expert):
            if self.hub.inline[e] is None:
                self.hub.to_expert[e][self.rank].put((Header(KIND_SHUTDOWN, 0, 0, 0, 0), []))


class InProcessExpert(ExpertEndpoint):
    def __init__(self, plane: DataPlane, rank: int, device: torch.device):
        self.rank, self.plane, self.device = rank, plane, device
        self.hub: Hub = plane.local

    def dispatch_wait(self) -> ExpertBatch | None:
        inbox = self.hub.to_expert[self.rank]
        messages = [_get(inbox[a], None if a == 0 else self.plane.timeout_s,
                         f"expert rank {self.rank}: no message from attention rank {a}")
                    for a in range(self.plane.num_attention)]
        headers = [h for h, _ in messages]
        if {h.kind for h in headers} == {KIND_SHUTDOWN}:
            return None
        if len({(h.kind, h.step, h.layer, h.micro_batch) for h in headers}) > 1:
            raise TransferError(f"expert rank {self.rank}: attention ranks are out of step: {headers}")
        h0 = headers[0]
        batch = ExpertBatch(h0.step, h0.layer, h0.micro_batch, [], [], [])
        for _, payload in messages:
            hidden, ids, weights = unpack_payload(payload, self.plane.hidden_size, self.plane.top_k,
                                                  self.plane.torch_dtype, self.device)
            batch.hidden.append(hidden)
            batch.topk_ids.append(ids)
            batch.topk_weights.append(weights)
        return batch

    def combine_launch(self, batch: ExpertBatch, outputs: list[torch.Tensor]) -> None:
        for a, out in enumerate(outputs):
            if out.shape[0]:
                self.hub.to_attention[a][self.rank].put(out)

    def close(self) -> None:
        pass
