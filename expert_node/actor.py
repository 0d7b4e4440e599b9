"""The Ray actor around ExpertRank. `serve()` runs for the life of the deployment (its own thread:
the actor is created with max_concurrency > 1 so health checks are answered meanwhile)."""

from __future__ import annotations

import os

import torch

from expert_node.rank import ExpertRank
from models.checkpoint import torch_dtype
from models.linear import useful_threads
from models.spec import ModelSpec
from scheduler.config import EngineConfig
from transfer.torch_dist import TorchDistExpertTransfer, init_data_plane, leave_data_plane


class ExpertRankActor:
    def __init__(self, rank: int, spec: ModelSpec, experts: list[int], config: EngineConfig, model_dir: str,
                 device: str, threads: int):
        self.threads = threads if config.threads_per_rank else useful_threads(spec, threads)
        self.config = config
        self.worker = ExpertRank(rank, spec, experts, config.dtype, model_dir, device)
        self.transfer: TorchDistExpertTransfer | None = None

    def join_data_plane(self, host: str, port: int, world_size: int, backend: str) -> None:
        cfg, w = self.config, self.worker
        init_data_plane(host, port, cfg.attention_ranks + w.rank, world_size, backend)
        self.transfer = TorchDistExpertTransfer(w.rank, cfg.attention_ranks, w.spec.hidden_size, w.spec.top_k,
                                                torch_dtype(cfg.dtype), w.device,
                                                cfg.transfer_timeout_s, backend)

    def serve(self) -> dict:
        # Ray runs this on a worker thread of the (threaded) actor; OpenMP's thread count is per
        # thread, so set it here or the experts run on one thread whatever __init__ said.
        torch.set_num_threads(self.threads)
        try:
            return self.worker.serve(self.transfer)
        finally:
            leave_data_plane()

    def check_health(self) -> dict:
        return {"rank": self.worker.rank, "pid": os.getpid(), "experts": self.worker.shard.experts,
                **self.worker.stats}

    def trace_events(self, since: float = 0.0) -> list:
        """The expert spans (scheduler.messages.TraceEvent) that started at or after `since`."""
        return [e for e in list(self.worker.trace) if e.start >= since]

    def tensors_read(self) -> list[str]:
        return self.worker.tensors_read
