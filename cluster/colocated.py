"""A one-node deployment in one process: the attention rank and the expert ranks as threads.

On a single machine, and above all on a few CPU cores, every message between rank processes costs
a process switch and a trip through the kernel, and the ranks only take turns anyway (one
micro-batch). `ColocatedRanks` builds the same `AttentionRank` and `ExpertRank`s as the
disaggregated deployment, but connects them through the in-process transfer backend
(transfer/inprocess.py): dispatch and combine hand tensors over by reference, and each expert rank
computes each message as it is dispatched, on the attention rank's thread (`Hub.serve_inline`): the
sides take turns anyway, and a thread per expert rank cost a thread switch per layer and, on small
batches, more time in the experts than the switch itself (measured in docs/performance.md). The
head cannot tell the difference: this actor answers the attention rank's calls. With one expert
rank the attention rank calls it directly (`AttentionEndpoint.inline_experts`): a layer at a time
(`ExpertRank.compute_rows`), or every layer of a decode step in one kernel call (`DecodeLayers`,
models/csrc/layer.cpp), the expert rank still counting and tracing its work. Multi-node and
multi-GPU deployments keep one process per rank.
"""

from __future__ import annotations

import os

from attention_node.rank import AttentionRank
from expert_node.rank import ExpertRank
from models.spec import ModelSpec
from scheduler.config import EngineConfig, EngineLimits
from scheduler.engine import InProcessRanks
from scheduler.messages import StepPlan, StepResult
from transfer.base import ATTENTION, EXPERT, DataPlane, connect
from transfer.inprocess import Hub


class ColocatedRanks:
    def __init__(self, spec: ModelSpec, config: EngineConfig, limits: EngineLimits, model_dir: str, device: str,
                 attention_threads: tuple[int, int] | None, experts: list[list[int]]):
        """experts[e]: the experts expert rank e owns."""
        if config.attention_ranks != 1:
            raise ValueError("a colocated deployment has one attention rank")
        owner = [0] * spec.num_experts
        for e, ids in enumerate(experts):
            for i in ids:
                owner[i] = e
        hub = Hub(1, len(experts))
        plane = DataPlane("inprocess", "", 0, 1, tuple(owner), spec.hidden_size, spec.top_k, config.dtype,
                          config.transfer_timeout_s, local=hub)
        self.expert_ranks = [ExpertRank(e, spec, ids, config.dtype, model_dir, connect(plane, EXPERT, e, device), device)
                             for e, ids in enumerate(experts)]
        for rank in self.expert_ranks:
            hub.serve_inline(rank.rank, rank.compute, rank)
        self.worker = AttentionRank(0, spec, config, limits, model_dir, connect(plane, ATTENTION, 0, device), device,
                                    attention_threads)

    def step(self, plan: StepPlan) -> StepResult:
        return self.worker.step(plan)

    def check_health(self) -> dict:
        experts = {k: sum(r.stats[k] for r in self.expert_ranks) for k in self.expert_ranks[0].stats}
        return {"rank": 0, "pid": os.getpid(), "kv_cache_bytes": self.worker.cache.nbytes(),
                "requests": len(self.worker.params), "colocated_expert_ranks": len(self.expert_ranks), **experts}

    def trace_events(self, since: float = 0.0) -> list:
        return [e for r in self.expert_ranks for e in list(r.trace) if e.start >= since]

    def tensors_read(self) -> list[str]:
        return self.worker.tensors_read + [n for r in self.expert_ranks for n in r.tensors_read]

    def shutdown(self) -> None:
        self.worker.close()


class InProcessColocated(InProcessRanks):
    """`ColocatedRanks` driven by an Engine in this process, without Ray (benchmarks and tests that
    look at the compute alone)."""

    def __init__(self, ranks: ColocatedRanks):
        self.colocated = ranks

    def run_step(self, plans: list[StepPlan]) -> list[StepResult]:
        return [self.colocated.step(plans[0])]

    def shutdown(self) -> None:
        self.colocated.shutdown()
