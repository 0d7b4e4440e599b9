"""M2N (dispatch) / N2M (combine) between attention ranks and expert ranks: the interface.

Each direction is split into a launch half and a wait half, so an attention rank can launch the
dispatch of micro-batch j, compute micro-batch j+1, and only then wait for j's combine:

  attention rank:  handle = dispatch_launch(...)  ...compute...  out = combine_wait(handle)
  expert rank:     batch = dispatch_wait()        ...experts...  combine_launch(batch, outputs)

Every wait that depends on a peer has a deadline and raises TransferError naming the peer rank,
the layer and the micro-batch; a dead peer never hangs a rank silently. The one exception is an
expert rank waiting for the *first* header of a micro-batch: an idle server sends nothing, so that
wait is open-ended (a dead attention rank still ends it: its socket closes).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch


class TransferError(RuntimeError):
    """A token transfer failed or timed out; the message names the peer, layer and micro-batch."""


@dataclass
class ExpertBatch:
    """What one expert rank received for one (layer, micro-batch), from every attention rank."""

    step: int
    layer: int
    micro_batch: int
    hidden: list[torch.Tensor]        # per attention rank: [n_a, H]
    topk_ids: list[torch.Tensor]      # per attention rank: [n_a, k] global expert ids
    topk_weights: list[torch.Tensor]  # per attention rank: [n_a, k] float32


class AttentionTransfer(abc.ABC):
    """The attention rank's side."""

    @abc.abstractmethod
    def dispatch_launch(self, step: int, layer: int, micro_batch: int, hidden: torch.Tensor,
                        topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> object:
        """Start sending hidden [T, H] with its routing to the expert ranks; returns a handle."""

    @abc.abstractmethod
    def combine_wait(self, handle: object) -> torch.Tensor:
        """Wait for every expert rank's answer; returns the routed-expert output [T, H]."""

    @abc.abstractmethod
    def close(self) -> None:
        """Tell every expert rank this attention rank is done (their loops end), then disconnect."""


class ExpertTransfer(abc.ABC):
    """The expert rank's side."""

    @abc.abstractmethod
    def dispatch_wait(self) -> ExpertBatch | None:
        """The next micro-batch from every attention rank, or None once all of them closed."""

    @abc.abstractmethod
    def combine_launch(self, batch: ExpertBatch, outputs: list[torch.Tensor]) -> None:
        """Start sending outputs[a] [n_a, H] back to attention rank a."""

    @abc.abstractmethod
    def close(self) -> None:
        """Finish pending sends and disconnect."""
