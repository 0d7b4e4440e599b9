"""The rank actors of one data-plane epoch, and the blueprint that creates them (again, after a fault).

A `RankBlueprint` is everything the deployment decided at start-up (placement groups, where each
rank runs, its threads, its environment); `spawn()` hosts a new rendezvous (a TCPStore on a free
port), creates every rank actor in its bundle (each joins the data plane, then loads its weights)
and starts the expert loops. Recovery kills the whole set and spawns a new one: a new epoch, so no
rank is left waiting on a peer of the old one.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass, field

import ray
import torch.distributed as dist
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from attention_node.actor import HEALTH_GROUP, AttentionRankActor
from cluster.colocated import ColocatedRanks
from cluster.roles import RankLayout
from expert_node.actor import ExpertRankActor
from models.spec import ModelSpec
from scheduler.config import EngineConfig, EngineLimits
from scheduler.engine import RankFault
from scheduler.placement import Placement
from transfer.base import DataPlane

log = logging.getLogger("shuttle.deployment")


class DeploymentError(RankFault):
    """A rank failed or did not answer; the message names which and why."""


def gather(refs, timeout_s: float, what: str, names: list[str] | None = None):
    """ray.get with a deadline, in completion order, so the first rank to fail is the one named (not a
    peer left waiting on it); failures carry the rank's own error text."""
    names = names or [f"rank {i}" for i in range(len(refs))]
    deadline = time.monotonic() + timeout_s
    pending = {ref: i for i, ref in enumerate(refs)}
    values: list = [None] * len(refs)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            late = ", ".join(names[i] for i in sorted(pending.values()))
            raise DeploymentError(f"{what}: {late} did not answer within {timeout_s:g}s")
        i = pending.pop(ready[0])
        try:
            values[i] = ray.get(ready[0])
        except ray.exceptions.RayTaskError as e:   # the rank raised: its own message says what happened
            cause = e.cause if e.cause is not None else e
            text = cause.args[0] if cause.args and isinstance(cause.args[0], str) else str(cause)
            raise DeploymentError(f"{what} failed on {names[i]}: {type(cause).__name__}: {text}") from e
        except ray.exceptions.RayError as e:       # the rank's process died
            raise DeploymentError(f"{what} failed on {names[i]}: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e
    return values


@dataclass
class RankSet:
    """One epoch's rank actors."""

    store: object                 # the rendezvous TCPStore (kept alive while the ranks use it)
    attention: list
    experts: list
    serve_refs: list              # the expert loops (end when every attention rank has shut down)
    pids: list = field(default_factory=list)   # attention ranks' then expert ranks' process ids
    epoch: int = 0                # 0 at start, +1 for each set that replaced a lost one

    def names(self) -> list[str]:
        return ([f"attention rank {i}" for i in range(len(self.attention))]
                + [f"expert rank {i}" for i in range(len(self.experts))])

    def kill(self) -> None:
        for actor in self.attention + self.experts:
            ray.kill(actor)

    def stop(self) -> None:
        """Orderly end (shutdown headers, expert loops return), then kill whatever is left."""
        try:
            gather([a.shutdown.remote() for a in self.attention], 30, "shutdown")
            gather(self.serve_refs, 30, "expert loops ending")
        except DeploymentError as e:
            log.warning("unclean shutdown (ranks are killed anyway): %s", e)
        self.kill()


@dataclass(frozen=True)
class RankBlueprint:
    spec: ModelSpec
    config: EngineConfig
    limits: EngineLimits
    placement: Placement
    layout: RankLayout
    model_dir: str
    host: str                     # the rendezvous host (this node's cluster address, or loopback)
    groups: tuple                 # (attention placement group, expert placement group)
    env: dict                     # node id → rank environment
    threads: dict                 # node id → NodeThreads

    def spawn(self, progress=lambda msg: None, epoch: int = 0) -> RankSet:
        cfg, layout = self.config, self.layout
        if cfg.colocate:
            return self._spawn_colocated(progress, epoch)
        progress(f"opening the data plane ({layout.backend}, rendezvous {self.host}, epoch {epoch})")
        store = dist.TCPStore(self.host, 0, world_size=None, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=120))
        plane = DataPlane(layout.backend, self.host, store.port, cfg.attention_ranks, tuple(self.placement.owner),
                          self.spec.hidden_size, self.spec.top_k, cfg.dtype, cfg.transfer_timeout_s)
        dev = layout.device
        attention = [ray.remote(concurrency_groups={HEALTH_GROUP: 1})(AttentionRankActor).options(**self._options(0, i, n))
                     .remote(i, self.spec, cfg, self.limits, self.model_dir, dev, self.threads[n].attention, plane)
                     for i, n in enumerate(layout.attention_nodes)]
        experts = [ray.remote(ExpertRankActor).options(**self._options(1, i, n, max_concurrency=4))
                   .remote(i, self.spec, self.placement.experts_of(i), cfg, self.model_dir, dev, self.threads[n].expert,
                           plane)
                   for i, n in enumerate(layout.expert_nodes)]
        ranks = RankSet(store, attention, experts, [], epoch=epoch)
        progress("joining the data plane and loading weights")
        try:
            health = gather([a.check_health.remote() for a in attention + experts], 600, "load weights", ranks.names())
        except BaseException:
            ranks.kill()
            raise
        ranks.pids = [h["pid"] for h in health]
        ranks.serve_refs = [e.serve.remote() for e in experts]
        return ranks

    def _spawn_colocated(self, progress, epoch: int) -> RankSet:
        node = self.layout.attention_nodes[0]
        experts = [self.placement.experts_of(e) for e in range(self.config.expert_ranks)]
        actor = (ray.remote(concurrency_groups={HEALTH_GROUP: 1})(ColocatedRanks).options(**self._options(0, 0, node))
                 .remote(self.spec, self.config, self.limits, self.model_dir, self.layout.device,
                         self.threads[node].attention, experts))
        ranks = RankSet(None, [actor], [], [], epoch=epoch)
        progress("loading weights (attention and expert ranks in one process)")
        try:
            health = gather([actor.check_health.remote()], 600, "load weights", ["the colocated ranks"])
        except BaseException:
            ranks.kill()
            raise
        ranks.pids = [h["pid"] for h in health]
        return ranks

    def _options(self, side: int, i: int, node_id: str, **extra) -> dict:
        if self.layout.gpus_per_rank:    # Ray sets CUDA_VISIBLE_DEVICES: "cuda" is the rank's own GPU
            extra["num_gpus"] = self.layout.gpus_per_rank
        strategy = PlacementGroupSchedulingStrategy(self.groups[side], placement_group_bundle_index=i)
        return dict(num_cpus=self.layout.cpus_per_rank, runtime_env={"env_vars": self.env[node_id]},
                    scheduling_strategy=strategy, **extra)
