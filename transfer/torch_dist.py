"""Transfer backend: torch.distributed point-to-point (gloo for CPU tensors, NCCL between GPUs).

Global ranks: attention ranks are 0..A-1, expert ranks are A..A+R-1. Messages are made and read by
`transfer/messages.py`; this file only moves them. Sends are `isend` (launch) and completed lazily;
every receive has a deadline except an expert rank's wait for the next header (see `transfer/base.py`).

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

from transfer.base import ATTENTION, AttentionEndpoint, DataPlane, ExpertBatch, ExpertEndpoint, TransferError
from transfer.messages import (KIND_DATA, KIND_SHUTDOWN, Header, Layout, dispatch_rows, merge_combine, payload_buffers,
                               unpack_payload)

# An idle expert rank waits for headers without a deadline; gloo needs *some* timeout.
_OPEN_ENDED = datetime.timedelta(days=3650)


def connect(plane: DataPlane, role: str, rank: int, device: torch.device) -> AttentionEndpoint | ExpertEndpoint:
    """Join the process group through the deployment's TCPStore, then build this rank's endpoint."""
    store = dist.TCPStore(plane.host, plane.port, world_size=None, is_master=False,
                          timeout=datetime.timedelta(seconds=plane.connect_timeout_s))
    global_rank = rank if role == ATTENTION else plane.num_attention + rank
    dist.init_process_group(plane.backend, store=store, rank=global_rank,
                            world_size=plane.num_attention + plane.num_expert, timeout=_OPEN_ENDED)
    endpoint = TorchDistAttention if role == ATTENTION else TorchDistExpert
    return endpoint(plane, rank, device)


def _leave() -> None:
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


def _post(op, *args, what: str):
    """Post an isend/irecv: a peer the backend already knows to be gone fails here, not in a wait."""
    try:
        return op(*args)
    except RuntimeError as e:
        raise TransferError(f"{what}: {_gloo_reason(e)}") from e


def _gloo_reason(e: Exception) -> str:
    """gloo's message without its source path and boilerplate: 'Connection reset by peer', ..."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". This is typically")[0]


def wire_device(backend: str, device: torch.device) -> torch.device:
    return device if backend == "nccl" else torch.device("cpu")


@dataclass
class _Dispatch:
    step: int
    layer: int
    micro_batch: int
    num_tokens: int
    sends: list = field(default_factory=list)      # (work, tensor kept alive until sent, expert rank)
    recvs: list = field(default_factory=list)      # (expert rank, token index, buffer, work)


class TorchDistAttention(AttentionEndpoint):
    def __init__(self, plane: DataPlane, rank: int, device: torch.device):
        self.rank = rank
        self.plane = plane
        self.owner = torch.tensor(plane.owner, dtype=torch.long, device=device)
        self.dtype, self.device = plane.torch_dtype, device
        self.wire = wire_device(plane.backend, device)
        self.layout = Layout(plane.hidden_size, plane.top_k, self.dtype, plane.inline_bytes)

    def _peer(self, e: int) -> int:
        return self.plane.num_attention + e

    def dispatch_launch(self, step, layer, micro_batch, hidden, topk_ids, topk_weights) -> _Dispatch:
        handle = _Dispatch(step, layer, micro_batch, hidden.shape[0])
        where = f"step {step}, layer {layer}, micro-batch {micro_batch}"
        for e, (idx, payload) in enumerate(dispatch_rows(hidden, topk_ids, topk_weights, self.owner, self.plane.num_expert)):
            n = hidden.shape[0] if idx is None else idx.numel()
            if n:   # post the combine's receive first, so it is there before the answer can be
                buf = torch.empty(n, self.plane.hidden_size, dtype=self.dtype, device=self.wire)
                handle.recvs.append((e, idx, buf, _post(dist.irecv, buf, self._peer(e),
                                                        what=f"attention rank {self.rank}: expert rank {e} unreachable ({where})")))
            msg, rest = self.layout.pack(Header(KIND_DATA, step, layer, micro_batch, n), payload, self.wire)
            for t in (msg, *rest):
                handle.sends.append((_post(dist.isend, t, self._peer(e),
                                           what=f"attention rank {self.rank}: expert rank {e} unreachable ({where})"), t, e))
        return handle

    def combine_wait(self, handle: _Dispatch) -> torch.Tensor:
        timeout = self.plane.timeout_s
        where = f"step {handle.step}, layer {handle.layer}, micro-batch {handle.micro_batch}"
        parts = []
        for e, idx, buf, work in handle.recvs:
            _wait(work, timeout, f"attention rank {self.rank}: no combine from expert rank {e} ({where}; timeout {timeout:g}s)")
            parts.append((idx, buf))
        out = merge_combine(handle.num_tokens, parts, self.plane.hidden_size, self.dtype, self.device)
        for work, _, e in handle.sends:
            _wait(work, timeout, f"attention rank {self.rank}: dispatch to expert rank {e} ({where}; timeout {timeout:g}s) not delivered")
        return out

    def close(self) -> None:
        try:
            msg, _ = self.layout.pack(Header(KIND_SHUTDOWN, 0, 0, 0, 0), [], self.wire)
            works = [dist.isend(msg, self._peer(e)) for e in range(self.plane.num_expert)]
            for e, work in enumerate(works):
                _wait(work, self.plane.timeout_s, f"attention rank {self.rank}: shutdown to expert rank {e}")
        finally:
            _leave()


class TorchDistExpert(ExpertEndpoint):
    def __init__(self, plane: DataPlane, rank: int, device: torch.device):
        self.rank = rank
        self.plane = plane
        self.dtype, self.device = plane.torch_dtype, device
        self.wire = wire_device(plane.backend, device)
        self.layout = Layout(plane.hidden_size, plane.top_k, self.dtype, plane.inline_bytes)
        self._headers = [self._post_header(a) for a in range(plane.num_attention)]
        self._pending_sends: list = []

    def _post_header(self, a: int):
        buf = self.layout.empty_message(self.wire)
        return buf, dist.irecv(buf, a)

    def dispatch_wait(self) -> ExpertBatch | None:
        timeout = self.plane.timeout_s
        headers = []
        for a, (buf, work) in enumerate(self._headers):
            # The first header may be a long time coming (idle server); the others follow at once.
            _wait(work, None if a == 0 else timeout,
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
                bufs = payload_buffers(h.count, self.plane.hidden_size, self.plane.top_k, self.dtype, self.wire)
                posted.append((bufs, [dist.irecv(b, a) for b in bufs]))
        batch = ExpertBatch(h0.step, h0.layer, h0.micro_batch, [], [], [])
        for a, (bufs, works) in enumerate(posted):
            for work in works:
                _wait(work, timeout, f"expert rank {self.rank}: payload from attention rank {a} ({where}; timeout {timeout:g}s) missing")
            hidden, ids, weights = unpack_payload(bufs, self.plane.hidden_size, self.plane.top_k, self.dtype, self.device)
            batch.hidden.append(hidden)
            batch.topk_ids.append(ids)
            batch.topk_weights.append(weights)
        # Post the next headers now, so they land while the experts compute.
        self._headers = [self._post_header(a) for a in range(self.plane.num_attention)]
        return batch

    def combine_launch(self, batch: ExpertBatch, outputs: list[torch.Tensor]) -> None:
        self._drain_sends()
        for a, out in enumerate(outputs):
            if out.shape[0]:
                out = out.to(self.wire).contiguous()
                self._pending_sends.append((dist.isend(out, a), out, a, batch.layer, batch.micro_batch))

    def _drain_sends(self) -> None:
        for work, _, a, layer, mb in self._pending_sends:
            _wait(work, self.plane.timeout_s, f"expert rank {self.rank}: combine to attention rank {a} (layer {layer}, micro-batch {mb}) not delivered")
        self._pending_sends = []

    def close(self) -> None:
        try:
            self._drain_sends()
        finally:
            _leave()
