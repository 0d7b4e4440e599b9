"""The Ray actor around ExpertRank. `serve()` runs for the life of the deployment (its own thread:
the actor is created with max_concurrency > 1 so health checks are answered meanwhile)."""

from __future__ import annotations

import os

import torch

from expert_node.rank import ExpertRank
from models.spec import ModelSpec
from scheduler.config import EngineConfig
from transfer.base import EXPERT, DataPlane, connect


class ExpertRankActor:
    def __init__(self, rank: int, spec: ModelSpec, experts: list[int], config: EngineConfig, model_dir: str,
                 device: str, threads: int, plane: DataPlane):
        """Joins the data plane (returns once every rank has), then loads this rank's experts."""
        self.threads = threads
        transfer = connect(plane, EXPERT, rank, device)
        self.worker = ExpertRank(rank, spec, experts, config.dtype, model_dir, transfer, device)

    def serve(self) -> dict:
        # Ray runs this on a worker thread of the (threaded) actor; OpenMP's thread count is per
        # thread, so set it here or the experts run on one thread whatever __init__ said.
        torch.set_num_threads(self.threads)
        return self.worker.serve()

    def check_health(self) -> dict:
        return {"rank": self.worker.rank, "pid": os.getpid(), "experts": self.worker.shard.experts,
                **self.worker.stats}

    def trace_events(self, since: float = 0.0) -> list:
        """The expert spans (scheduler.messages.TraceEvent) that started at or after `since`."""
        return [e for e in list(self.worker.trace) if e.start >= since]

    def tensors_read(self) -> list[str]:
        return self.worker.tensors_read
