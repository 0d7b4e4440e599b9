"""Bring a deployment up on Ray and drive it: placement groups, rank actors, the data plane.

`Deployment.start(model_dir, config)` starts (or joins) Ray, reserves one placement group for the
attention ranks and one for the expert ranks, creates the actors, has them load their weights,
opens the data plane (a TCPStore hosted here on a free port, gloo or NCCL), and starts the expert
loops. It is the `RankGroup` the head's Engine steps. `shutdown()` ends the expert loops, kills
the actors, removes the placement groups and, if it started Ray, stops it: nothing is left running.
"""

from __future__ import annotations

import datetime
import logging
import os
import time

import ray
import torch.distributed as dist
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from attention_node.actor import AttentionRankActor
from cluster.ray_env import local_ray_env, start_ray
from expert_node.actor import ExpertRankActor
from models.spec import ModelSpec, load_spec
from scheduler.config import EngineConfig, EngineLimits
from scheduler.engine import Engine, RankGroup
from scheduler.messages import StepPlan, StepResult
from scheduler.placement import Placement

log = logging.getLogger("shuttle.deployment")


class DeploymentError(RuntimeError):
    """A rank failed or did not answer; the message names which and why."""


def describe(model_dir: str, config: EngineConfig) -> tuple[ModelSpec, EngineLimits, Placement]:
    """What a deployment of this model with this config would be, checked without starting anything."""
    spec = load_spec(model_dir)
    limits = EngineLimits.derive(config, max_position_embeddings=spec.max_position_embeddings,
                                 vocab_size=spec.vocab_size, eos_token_ids=spec.eos_token_ids)
    return spec, limits, Placement.contiguous(spec.num_experts, config.expert_ranks)


def default_threads(config: EngineConfig, cores: int) -> int:
    """With one micro-batch the attention ranks and the expert ranks take turns, so each side may use
    all the node's cores; with ping-pong both sides run at once and share them (oversubscribing
    2 cores with 4 threads measured 1.5-2x slower per step)."""
    if config.micro_batches == 1:
        return max(1, cores // max(config.attention_ranks, config.expert_ranks))
    return max(1, cores // (config.attention_ranks + config.expert_ranks))


class Deployment(RankGroup):
    def __init__(self, spec: ModelSpec, config: EngineConfig, limits: EngineLimits, placement: Placement,
                 attention, experts, groups, store, serve_refs, owns_ray: bool):
        self.spec, self.config, self.limits, self.placement = spec, config, limits, placement
        self.attention = attention
        self.experts = experts
        self._groups = groups
        self._store = store          # keeps the data plane's TCPStore alive
        self._serve_refs = serve_refs
        self._owns_ray = owns_ray
        self._closed = False

    # ---- bring-up ------------------------------------------------------------------------
    @classmethod
    def start(cls, model_dir: str, config: EngineConfig, address: str | None = None,
              progress=lambda msg: None) -> "Deployment":
        spec, limits, placement = describe(model_dir, config)
        owns_ray = start_ray(address)
        n_ranks = config.attention_ranks + config.expert_ranks
        cpus = config.cpus_per_rank or min(1.0, ray.cluster_resources().get("CPU", 1) / n_ranks)
        threads = config.threads_per_rank or default_threads(config, os.cpu_count() or 1)
        groups = []
        try:
            progress(f"reserving {config.attention_ranks} attention + {config.expert_ranks} expert rank slots ({cpus:g} CPU each)")
            for n in (config.attention_ranks, config.expert_ranks):
                pg = placement_group([{"CPU": cpus}] * n, strategy="PACK")
                groups.append(pg)
                if not pg.wait(timeout_seconds=60):
                    raise DeploymentError(f"Ray could not reserve {n} slots of {cpus:g} CPU: cluster has {ray.cluster_resources()}")

            def opts(pg, i, **extra):
                return dict(num_cpus=cpus, runtime_env={"env_vars": local_ray_env()},
                            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i), **extra)

            device = "cpu"
            attention = [ray.remote(AttentionRankActor).options(**opts(groups[0], i), name=None)
                         .remote(i, spec, config, limits, model_dir, device, threads)
                         for i in range(config.attention_ranks)]
            experts = [ray.remote(ExpertRankActor).options(**opts(groups[1], i, max_concurrency=4))
                       .remote(i, spec, placement.experts_of(i), config, model_dir, device, threads)
                       for i in range(config.expert_ranks)]
            progress("loading weights")
            _get([a.check_health.remote() for a in attention + experts], 600, "load weights")
            progress("opening the data plane")
            store = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True, wait_for_workers=False,
                                  timeout=datetime.timedelta(seconds=120))
            world = n_ranks
            joins = [a.join_data_plane.remote("127.0.0.1", store.port, world, "gloo", list(placement.owner)) for a in attention]
            joins += [e.join_data_plane.remote("127.0.0.1", store.port, world, "gloo") for e in experts]
            _get(joins, 120, "join the data plane")
            serve_refs = [e.serve.remote() for e in experts]
        except BaseException:
            for pg in groups:
                remove_placement_group(pg)
            if owns_ray:
                ray.shutdown()
            raise
        progress("ready")
        return cls(spec, config, limits, placement, attention, experts, groups, store, serve_refs, owns_ray)

    # ---- the RankGroup contract ----------------------------------------------------------
    def run_step(self, plans: list[StepPlan]) -> list[StepResult]:
        refs = [a.step.remote(p) for a, p in zip(self.attention, plans)]
        return _get(refs, self.config.step_timeout_s, f"step {plans[0].step}", names=[f"attention rank {i}" for i in range(len(refs))])

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            _get([a.shutdown.remote() for a in self.attention], 30, "shutdown")
            _get(self._serve_refs, 30, "expert loops ending")
        except DeploymentError as e:
            log.warning("unclean shutdown (ranks are killed anyway): %s", e)
        for actor in self.attention + self.experts:
            ray.kill(actor)
        for pg in self._groups:
            remove_placement_group(pg)
        if self._owns_ray:
            ray.shutdown()

    # ---- inspection ----------------------------------------------------------------------
    def health(self) -> list[dict]:
        return _get([a.check_health.remote() for a in self.attention + self.experts], 30, "health check")


def _get(refs, timeout_s: float, what: str, names: list[str] | None = None):
    """ray.get with a deadline; failures name the rank and carry the rank's own error text."""
    names = names or [f"rank {i}" for i in range(len(refs))]
    deadline = time.monotonic() + timeout_s
    for i, ref in enumerate(refs):
        try:
            ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
        except ray.exceptions.GetTimeoutError:
            raise DeploymentError(f"{what}: {names[i]} did not answer within {timeout_s:g}s") from None
        except ray.exceptions.RayTaskError as e:   # the rank raised: its own message says what happened
            cause = e.cause if e.cause is not None else e
            text = cause.args[0] if cause.args and isinstance(cause.args[0], str) else str(cause)
            raise DeploymentError(f"{what} failed on {names[i]}: {type(cause).__name__}: {text}") from e
        except ray.exceptions.RayError as e:       # the rank's process died
            raise DeploymentError(f"{what} failed on {names[i]}: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e
    return ray.get(refs)


def build_engine(model_dir: str, config: EngineConfig, address: str | None = None, progress=lambda msg: None) -> Engine:
    deployment = Deployment.start(model_dir, config, address, progress)
    return Engine(config, deployment.limits, deployment)
