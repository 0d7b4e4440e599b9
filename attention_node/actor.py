"""The Ray actor around AttentionRank: lifecycle and typed calls, no logic of its own."""

from __future__ import annotations

import os

from attention_node.rank import AttentionRank
from models.linear import useful_threads
from models.spec import ModelSpec
from scheduler.config import EngineConfig, EngineLimits
from scheduler.messages import StepPlan, StepResult
from transfer.torch_dist import TorchDistAttentionTransfer, init_data_plane, leave_data_plane


class AttentionRankActor:
    def __init__(self, rank: int, spec: ModelSpec, config: EngineConfig, limits: EngineLimits, model_dir: str,
                 device: str, threads: int, small_step_threads: int | None = None):
        """threads: for the LM head and prefill-sized steps; small_step_threads: for the layers of decode-sized
        steps (default: the same)."""
        full = threads if config.threads_per_rank else useful_threads(spec, threads)
        small = min(full, small_step_threads or full)
        self.config = config
        self.worker = AttentionRank(rank, spec, config, limits, model_dir, device)
        self.worker.threads = (small, full)
        self.transfer: TorchDistAttentionTransfer | None = None

    def join_data_plane(self, host: str, port: int, world_size: int, backend: str, owner: list[int]) -> None:
        init_data_plane(host, port, self.worker.rank, world_size, backend)
        w = self.worker
        self.transfer = TorchDistAttentionTransfer(w.rank, self.config.attention_ranks, owner, w.spec.hidden_size,
                                                   w.spec.top_k, w.dtype, w.device, self.config.transfer_timeout_s, backend)
        w.connect(self.transfer)

    def step(self, plan: StepPlan) -> StepResult:
        return self.worker.step(plan)     # sets the (per calling thread) OpenMP thread count itself

    def check_health(self) -> dict:
        return {"rank": self.worker.rank, "pid": os.getpid(), "kv_cache_bytes": self.worker.cache.nbytes(),
                "requests": len(self.worker.params)}

    def tensors_read(self) -> list[str]:
        return self.worker.tensors_read

    def shutdown(self) -> None:
        """Send the expert ranks our shutdown header, then leave the data plane."""
        try:
            if self.transfer is not None:
                self.transfer.close()
        finally:
            leave_data_plane()
