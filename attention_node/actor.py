"""The Ray actor around AttentionRank: lifecycle and typed calls, no logic of its own."""

from __future__ import annotations

import os

from attention_node.rank import AttentionRank
from models.spec import ModelSpec
from scheduler.config import EngineConfig, EngineLimits
from scheduler.messages import StepPlan, StepResult
from transfer.base import ATTENTION, DataPlane, connect

# The Ray concurrency group for health checks: an actor created with
# `ray.remote(concurrency_groups={HEALTH_GROUP: 1})` answers `check_health` sent to this group on a
# thread of its own while a step runs. Steps stay in the default group: one thread, in launch order.
HEALTH_GROUP = "health"


class AttentionRankActor:
    def __init__(self, rank: int, spec: ModelSpec, config: EngineConfig, limits: EngineLimits, model_dir: str,
                 device: str, threads: tuple[int, int] | None, plane: DataPlane):
        """Joins the data plane (returns once every rank has), then loads this rank's weights.
        threads: (decode-sized steps' layers, everything else), as cluster/threads.py decides."""
        transfer = connect(plane, ATTENTION, rank, device)
        self.worker = AttentionRank(rank, spec, config, limits, model_dir, transfer, device, threads)

    def step(self, plan: StepPlan) -> StepResult:
        return self.worker.step(plan)     # sets the (per calling thread) OpenMP thread count itself

    def check_health(self) -> dict:
        """Reads only (safe beside a running step: see HEALTH_GROUP)."""
        return {"rank": self.worker.rank, "pid": os.getpid(), "kv_cache_bytes": self.worker.cache.nbytes(),
                "requests": len(self.worker.params)}

    def tensors_read(self) -> list[str]:
        return self.worker.tensors_read

    def shutdown(self) -> None:
        """Send the expert ranks our shutdown header, then leave the data plane."""
        self.worker.close()
