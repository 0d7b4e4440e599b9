"""M2N (dispatch) / N2M (combine) between attention ranks and expert ranks: the interface.

Legend: T tokens in a micro-batch, H hidden size, k experts per token, n_a tokens from attention rank a.

`connect(plane, role, rank, device)` joins a rank to the data plane and gives it its *endpoint*.
Each direction is split into a launch half and a wait half, so an attention rank can launch the
dispatch of micro-batch j, compute micro-batch j+1, and only then wait for j's combine:

  attention endpoint:  handle = dispatch_launch(...)  ...compute...  out = combine_wait(handle)
  expert endpoint:     batch = dispatch_wait()        ...experts...  combine_launch(batch, outputs)

What travels, and how it is packed and unpacked, is `transfer/messages.py`; how bytes move is one
backend per file (`transfer/torch_dist.py`: gloo or NCCL point-to-point). A backend is a module of
this package with `connect(plane, role, rank, device)`; `DataPlane.backend` names it, so a new one
(shared memory, RDMA) is a new file and nothing else.

Every wait that depends on a peer has a deadline and raises TransferError naming the peer rank,
the layer and the micro-batch; a dead peer never hangs a rank silently. The one exception is an
expert rank waiting for the *first* header of a micro-batch: an idle server sends nothing, so that
wait is open-ended (a dead attention rank still ends it: its socket closes).
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass
from typing import Protocol

import torch

ATTENTION = "attention"
EXPERT = "expert"
# torch.distributed's own backend names are served by transfer/torch_dist.py
_TORCH_DIST = ("gloo", "nccl")


class TransferError(RuntimeError):
    """A token transfer failed or timed out; the message names the peer, layer and micro-batch."""


@dataclass(frozen=True)
class DataPlane:
    """Everything every rank needs to join one deployment's data plane (built by cluster/, picklable).

    Ranks are numbered per side: attention ranks 0..A-1, expert ranks 0..R-1."""

    backend: str                  # "gloo" | "nccl" (transfer/torch_dist.py), or a module name of this package
    host: str                     # the rendezvous (a TCPStore the deployment hosts)
    port: int
    num_attention: int
    owner: tuple[int, ...]        # [E] logical expert → expert rank
    hidden_size: int
    top_k: int
    dtype: str                    # "float32" | "bfloat16" | ...: the hidden states' dtype on the wire
    timeout_s: float              # deadline of every wait on a peer (but an idle expert rank's)
    inline_bytes: int = 64 * 1024
    connect_timeout_s: float = 120.0
    local: object = None          # backend "inprocess": the ranks' shared hub (never crosses a process)

    @property
    def num_expert(self) -> int:
        return max(self.owner) + 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class ExpertBatch:
    """What one expert rank received for one (layer, micro-batch), from every attention rank."""

    step: int
    layer: int
    micro_batch: int
    hidden: list[torch.Tensor]        # per attention rank: [n_a, H]
    topk_ids: list[torch.Tensor]      # per attention rank: [n_a, k] global expert ids
    topk_weights: list[torch.Tensor]  # per attention rank: [n_a, k] float32


class AttentionEndpoint(abc.ABC):
    """The attention rank's side: dispatch launch, combine wait."""

    @abc.abstractmethod
    def dispatch_launch(self, step: int, layer: int, micro_batch: int, hidden: torch.Tensor,
                        topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> object:
        """Start sending hidden [T, H] with its routing (ids, weights [T, k]) to the expert ranks; returns a handle."""

    @abc.abstractmethod
    def combine_wait(self, handle: object) -> torch.Tensor:
        """Wait for every expert rank's answer; returns the routed-expert output [T, H]."""

    @abc.abstractmethod
    def close(self) -> None:
        """Tell every expert rank this attention rank is done (their loops end), then leave the data plane."""

    def inline_experts(self) -> InlineExperts | None:
        """Where the expert side answers on the calling thread with nothing to overlap (the in-process
        backend with one inline expert rank): that expert rank, which the attention rank calls in place
        of dispatch_launch + combine_wait. None (the default) everywhere else."""
        return None


class InlineExperts(Protocol):
    """An expert rank that answers on the attention rank's thread (expert_node/rank.py ExpertRank)."""

    def compute_rows(self, step: int, layer: int, micro_batch: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                     topk_weights: torch.Tensor) -> torch.Tensor:
        """One layer: hidden [T, H], global expert ids and float32 weights [T, k] → routed output [T, H]."""

    def decode_kernel_args(self) -> tuple | None:
        """(local index [E], up panels, down panels per MoE layer) for a whole-step decode kernel
        (models/csrc/layer.cpp DecodeLayers), or None where its weights are not panel-packed."""

    def record_decode(self, step: int, micro_batch: int, rows: int, counts: torch.Tensor, times: torch.Tensor) -> None:
        """The counters and trace `compute_rows` keeps, for the MoE layers such a kernel ran:
        counts [L, X] rows per local expert, times [L, 2] each layer's start and end (time.time())."""


class ExpertEndpoint(abc.ABC):
    """The expert rank's side: dispatch wait, combine launch."""

    @abc.abstractmethod
    def dispatch_wait(self) -> ExpertBatch | None:
        """The next micro-batch from every attention rank, or None once all of them closed."""

    @abc.abstractmethod
    def combine_launch(self, batch: ExpertBatch, outputs: list[torch.Tensor]) -> None:
        """Start sending outputs[a] [n_a, H] back to attention rank a."""

    @abc.abstractmethod
    def close(self) -> None:
        """Finish pending sends and leave the data plane."""


def connect(plane: DataPlane, role: str, rank: int, device: torch.device | str = "cpu"
            ) -> AttentionEndpoint | ExpertEndpoint:
    """Join the data plane as attention or expert rank `rank` (blocks until every rank has joined)."""
    if role not in (ATTENTION, EXPERT):
        raise ValueError(f"role must be {ATTENTION!r} or {EXPERT!r}, got {role!r}")
    module = "torch_dist" if plane.backend in _TORCH_DIST else plane.backend
    try:
        backend = importlib.import_module(f"transfer.{module}")
    except ModuleNotFoundError:
        raise ValueError(f"unknown data-plane backend {plane.backend!r}: no module transfer/{module}.py") from None
    return backend.connect(plane, role, rank, torch.device(device))
