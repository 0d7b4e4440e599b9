"""Transfer backend 1: torch.distributed point-to-point (gloo for CPU tensors, NCCL between GPUs).

Global ranks: attention ranks are 0..A-1, expert ranks are A..A+R-1. Messages follow
`transfer/plan.py`. Sends are `isend` (launch) and completed lazily; every receive has a deadline
except an expert rank's wait for the next header (see `transfer/base.py`).

The wire device is where messages live: the compute device for NCCL (GPU to GPU), host memory for
gloo. Ranks that compute on a GPU but share it (NCCL refuses two ranks on one device) use gloo and
stage through host memory. With NCCL, set TORCH_NCCL_BLOCKING_WAIT=1 so that `wait(timeout)`
really bounds a wait on a dead peer (the deployment sets it for rank processes).
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from transfer.base import AttentionTransfer, ExpertBatch, ExpertTransfer, TransferError
from transfer.plan import (INLINE_BYTES, KIND_DATA, KIND_SHUTDOWN, Header, Layout, pack_payload, payload_buffers, route_plan,
                           unpack_payload)

# An idle expert rank waits for headers without a deadline; gloo needs *some* timeout.
_OPEN_ENDED = datetime.timedelta(days=3650)


def init_data_plane(store_host: str, store_port: int, rank: int, world_size: int, backend: str,
                    connect_timeout_s: float = 120.0) -> None:
    """Join the data-plane process group through the head's TCPStore."""
    store = dist.TCPStore(store_host, store_port, world_size=None, is_master=False,
                          timeout=datetime.timedelta(seconds=connect_timeout_s))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=_OPEN_ENDED)


def leave_data_plane() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _wait(work, timeout_s: float | None, what: str) -> None:
    try:
        if timeout_s is None:
            work.wait()
        else:
            work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:
        raise TransferError(f"{what}: {_gloo_reason(e)}") from e


def _gloo_reason(e: Exception) -> str:
    """gloo's message without its source path and boilerplate: 'Connection reset by peer', ..."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". This is typically")[0]


@dataclass
class _Dispatch:
    step: int
    layer: int
    micro_batch: int
    num_tokens: int
    sends: list = field(default_factory=list)      # (work, tensor kept alive until sent, expert rank)
    recvs: list = field(default_factory=list)      # (expert rank, token index, buffer, work)


def wire_device(backend: str, device: torch.device) -> torch.device:
    return device if backend == "nccl" else torch.device("cpu")


class TorchDistAttentionTransfer(AttentionTransfer):
    def __init__(self, attention_rank: int, num_attention: int, owner: list[int], hidden_size: int,
                 top_k: int, dtype: torch.dtype, device: torch.device, timeout_s: float, backend: str = "gloo",
                 inline_bytes: int = INLINE_BYTES):
        self.rank = attention_rank
        self.num_attention = num_attention
        self.num_expert = max(owner) + 1
        self.owner = torch.tensor(owner, dtype=torch.long, device=device)
        self.hidden_size, self.top_k, self.dtype, self.device = hidden_size, top_k, dtype, device
        self.wire = wire_device(backend, device)
        self.timeout_s = timeout_s
        self.layout = Layout(hidden_size, top_k, dtype, inline_bytes)

    def _peer(self, e: int) -> int:
        return self.num_attention + e

    def dispatch_launch(self, step, layer, micro_batch, hidden, topk_ids, topk_weights) -> _Dispatch:
        handle = _Dispatch(step, layer, micro_batch, hidden.shape[0])
        # One expert rank gets every token: no routing, no row copies (idx None: all rows, in order).
        routes = [None] if self.num_expert == 1 else route_plan(topk_ids, self.owner, self.num_expert)
        for e, idx in enumerate(routes):
            n = hidden.shape[0] if idx is None else idx.numel()
            if n:   # post the combine's receive first, so it is there before the answer can be
                buf = torch.empty(n, self.hidden_size, dtype=self.dtype, device=self.wire)
                handle.recvs.append((e, idx, buf, dist.irecv(buf, self._peer(e))))
            rows = (hidden, topk_ids, topk_weights) if idx is None else (hidden[idx], topk_ids[idx], topk_weights[idx])
            payload = pack_payload(*rows) if n else []
            msg, rest = self.layout.pack(Header(KIND_DATA, step, layer, micro_batch, n), payload, self.wire)
            for t in (msg, *rest):
                handle.sends.append((dist.isend(t, self._peer(e)), t, e))
        return handle

    def combine_wait(self, handle: _Dispatch) -> torch.Tensor:
        where = f"step {handle.step}, layer {handle.layer}, micro-batch {handle.micro_batch}"
        parts = []
        for e, idx, buf, work in handle.recvs:
            _wait(work, self.timeout_s, f"attention rank {self.rank}: no combine from expert rank {e} ({where}; timeout {self.timeout_s:g}s)")
            parts.append((idx, buf.to(self.device)))
        if len(parts) == 1 and parts[0][0] is None:     # the only expert rank answered for every row
            out = parts[0][1]
        else:
            out = torch.zeros(handle.num_tokens, self.hidden_size, dtype=self.dtype, device=self.device)
            for idx, part in parts:
                out.index_add_(0, idx, part)
        for work, _, e in handle.sends:
            _wait(work, self.timeout_s, f"attention rank {self.rank}: dispatch to expert rank {e} ({where}; timeout {self.timeout_s:g}s) not delivered")
        return out

    def close(self) -> None:
        msg, _ = self.layout.pack(Header(KIND_SHUTDOWN, 0, 0, 0, 0), [], self.wire)
        works = [dist.isend(msg, self._peer(e)) for e in range(self.num_expert)]
        for e, work in enumerate(works):
            _wait(work, self.timeout_s, f"attention rank {self.rank}: shutdown to expert rank {e}")


class TorchDistExpertTransfer(ExpertTransfer):
    def __init__(self, expert_rank: int, num_attention: int, hidden_size: int, top_k: int,
                 dtype: torch.dtype, device: torch.device, timeout_s: float, backend: str = "gloo",
                 inline_bytes: int = INLINE_BYTES):
        self.rank = expert_rank
        self.num_attention = num_attention
        self.hidden_size, self.top_k, self.dtype, self.device = hidden_size, top_k, dtype, device
        self.wire = wire_device(backend, device)
        self.timeout_s = timeout_s
        self.layout = Layout(hidden_size, top_k, dtype, inline_bytes)
        self._headers = [self._post_header(a) for a in range(num_attention)]
        self._pending_sends: list = []

    def _post_header(self, a: int):
        buf = self.layout.empty_message(self.wire)
        return buf, dist.irecv(buf, a)

    def dispatch_wait(self) -> ExpertBatch | None:
        headers = []
        for a, (buf, work) in enumerate(self._headers):
            # The first header may be a long time coming (idle server); the others follow at once.
            _wait(work, None if a == 0 else self.timeout_s,
                  f"expert rank {self.rank}: no header from attention rank {a}"
                  + (f" (after {headers[0]})" if headers else ""))
            headers.append(self.layout.header(buf))
        kinds = {h.kind for h in headers}
        if kinds == {KIND_SHUTDOWN}:
            return None
        if len(kinds) > 1 or len({(h.step, h.layer, h.micro_batch) for h in headers}) > 1:
            raise TransferError(f"expert rank {self.rank}: attention ranks are out of step: {headers}")
        h0 = headers[0]
        where = f"step {h0.step}, layer {h0.layer}, micro-batch {h0.micro_batch}"
        posted = []
        for a, h in enumerate(headers):
            if h.count == 0:
                posted.append(([], []))
            elif h.count <= self.layout.inline_rows:
                posted.append((self.layout.inline_payload(self._headers[a][0], h.count), []))
            else:
                bufs = payload_buffers(h.count, self.hidden_size, self.top_k, self.dtype, self.wire)
                posted.append((bufs, [dist.irecv(b, a) for b in bufs]))
        batch = ExpertBatch(h0.step, h0.layer, h0.micro_batch, [], [], [])
        for a, (bufs, works) in enumerate(posted):
            for work in works:
                _wait(work, self.timeout_s, f"expert rank {self.rank}: payload from attention rank {a} ({where}; timeout {self.timeout_s:g}s) missing")
            if bufs:
                hidden, ids, weights = unpack_payload([b.to(self.device) for b in bufs], self.hidden_size, self.top_k)
            else:
                hidden = torch.empty(0, self.hidden_size, dtype=self.dtype, device=self.device)
                ids = torch.empty(0, self.top_k, dtype=torch.long, device=self.device)
                weights = torch.empty(0, self.top_k, dtype=torch.float32, device=self.device)
            batch.hidden.append(hidden)
            batch.topk_ids.append(ids)
            batch.topk_weights.append(weights)
        # Post the next headers now, so they land while the experts compute.
        self._headers = [self._post_header(a) for a in range(self.num_attention)]
        return batch

    def combine_launch(self, batch: ExpertBatch, outputs: list[torch.Tensor]) -> None:
        self._drain_sends()
        for a, out in enumerate(outputs):
            if out.shape[0]:
                out = out.to(self.wire).contiguous()
                self._pending_sends.append((dist.isend(out, a), out, a, batch.layer, batch.micro_batch))

    def _drain_sends(self) -> None:
        for work, _, a, layer, mb in self._pending_sends:
            _wait(work, self.timeout_s, f"expert rank {self.rank}: combine to attention rank {a} (layer {layer}, micro-batch {mb}) not delivered")
        self._pending_sends = []

    def close(self) -> None:
        self._drain_sends()
