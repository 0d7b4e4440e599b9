"""Bring a deployment up on Ray and drive it: placement groups, rank actors, the data plane.

`Deployment.start(model_dir, config)` starts (or joins) Ray, takes each node's inventory and decides
where every rank runs (`cluster/roles.py`: declared role resources, else GPU models, else CPU
slots), checks that the rank nodes reach each other, reserves one placement group for the
attention ranks and one for the expert ranks (each bundle pinned to its node), hosts the data
plane's rendezvous (a TCPStore on a free port, on this node's cluster address; gloo, or NCCL when
every rank has its own GPU), creates the actors (each joins the data plane, then loads its
weights) and starts the expert loops. It is the `RankGroup` the head's Engine steps. `shutdown()` ends the expert loops, kills
the actors, removes the placement groups and, if it started Ray, stops it: nothing is left running.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass

import ray
from ray.util.placement_group import NODE_ID_LABEL_KEY, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from attention_node.actor import HEALTH_GROUP
from cluster import threads
from cluster.inventory import NodeInventory, gather_inventory, local_gpus, node_from_ray
from cluster.ray_env import local_ray_env, start_ray
from cluster.reach import ReachProbe
from cluster.rank_set import DeploymentError, RankBlueprint, RankSet, gather
from cluster.roles import PlacementError, RankLayout, plan_layout
from models.spec import ModelSpec, load_spec
from scheduler.config import EngineConfig, EngineLimits
from scheduler.engine import Engine, FaultyRank, RankGroup
from scheduler.messages import StepPlan, StepResult
from scheduler.placement import Placement

log = logging.getLogger("shuttle.deployment")


def describe(model_dir: str, config: EngineConfig) -> tuple[ModelSpec, EngineLimits, Placement]:
    """What a deployment of this model with this config would be, checked without starting anything."""
    spec = load_spec(model_dir)
    limits = EngineLimits.derive(config, max_position_embeddings=spec.max_position_embeddings,
                                 vocab_size=spec.vocab_size, eos_token_ids=spec.eos_token_ids)
    return spec, limits, Placement.contiguous(spec.num_experts, config.expert_ranks)


class Deployment(RankGroup):
    def __init__(self, blueprint: RankBlueprint, nodes: list[NodeInventory], ranks: RankSet, owns_ray: bool):
        b = blueprint
        self.spec, self.config, self.limits, self.placement = b.spec, b.config, b.limits, b.placement
        self.layout = b.layout        # where the ranks run (cluster.roles)
        self.nodes = nodes
        self._blueprint = blueprint
        self._ranks = ranks           # the rank actors of the current data-plane epoch
        self._owns_ray = owns_ray
        self._closed = False
        self.recoveries = 0
        self.recovery_seconds: list[float] = []

    @property
    def attention(self) -> list:
        return self._ranks.attention

    @property
    def experts(self) -> list:
        return self._ranks.experts

    # ---- bring-up ------------------------------------------------------------------------
    @classmethod
    def start(cls, model_dir: str, config: EngineConfig, address: str | None = None,
              progress=lambda msg: None, *, device: str = "auto", reach_timeout_s: float = 5.0) -> "Deployment":
        """`address` None: a private Ray on this machine (or the one already initialized here), data
        plane on loopback. Otherwise join that cluster ("auto", "HOST:PORT"): ranks go where
        `cluster.roles.plan_layout` says, the rendezvous is this node's cluster address, and each
        rank's gloo/NCCL interface is its node's route to it. `device`: auto | cpu | cuda."""
        spec, limits, placement = describe(model_dir, config)
        if config.colocate and address is not None:
            raise DeploymentError("--colocate runs every rank in one process on this machine: it cannot join a "
                                  f"cluster (--address {address})")
        if address and address.startswith("ray://"):
            raise DeploymentError(f"--address {address}: Ray Client addresses are not supported (the ranks must reach "
                                  "this process's rendezvous): run shuttle on a node of the cluster (`ray attach`) "
                                  "with --address auto")
        owns_ray = start_ray(address)
        groups = []
        try:
            if address is None:
                host, nodes = "127.0.0.1", [_this_node()]
            else:
                host = ray.util.get_node_ip_address()
                progress(f"joined the Ray cluster at {address}; taking each node's inventory")
                nodes = gather_inventory(route_host=host)
            try:
                layout = plan_layout(nodes, config.attention_ranks, config.expert_ranks, config.cpus_per_rank, device)
            except PlacementError as e:
                raise DeploymentError(f"placement: {e}") from None
            by_id = {n.node_id: n for n in nodes}
            env = {i: _rank_env(by_id[i], host, cluster=address is not None) for i in layout.nodes_used()}
            for line in _layout_lines(layout, by_id, cluster=address is not None):
                progress(line)
            if address is not None:
                _check_reach(layout, by_id, host, reach_timeout_s)
            per_node = {i: node_threads(config, layout, by_id[i], spec) for i in layout.nodes_used()}

            for side, node_ids in (("attention", layout.attention_nodes), ("expert", layout.expert_nodes)):
                bundles = [layout.bundle(side)] * len(node_ids)
                pins = [{NODE_ID_LABEL_KEY: i} for i in node_ids] if address is not None else None
                pg = placement_group(bundles, strategy="PACK", bundle_label_selector=pins)
                groups.append(pg)
                if not pg.wait(timeout_seconds=60):
                    raise DeploymentError(f"Ray could not reserve {len(bundles)} {side} rank slots of {bundles[0]} "
                                          f"within 60s: cluster has {ray.cluster_resources()}, free {ray.available_resources()}")
                if pins:       # the label pins are hard constraints; check Ray kept them
                    placed = ray.util.placement_group_table(pg)["bundles_to_node_id"]
                    wrong = [i for i, want in enumerate(node_ids) if placed.get(i) != want]
                    if wrong:
                        raise DeploymentError(f"Ray placed {side} rank slots {wrong} on other nodes than planned: "
                                              f"{placed} vs {list(node_ids)}")

            blueprint = RankBlueprint(spec, config, limits, placement, layout, model_dir, host, tuple(groups), env, per_node)
            ranks = blueprint.spawn(progress)
        except BaseException:
            for pg in groups:
                remove_placement_group(pg)
            if owns_ray:
                ray.shutdown()
            raise
        progress("ready")
        return cls(blueprint, nodes, ranks, owns_ray)

    # ---- the RankGroup contract ----------------------------------------------------------
    def launch(self, plans: list[StepPlan]) -> tuple[int, list]:
        """Ray runs an actor's calls from one caller in order, so a step launched ahead waits its turn on the rank."""
        return plans[0].step, [a.step.remote(p) for a, p in zip(self.attention, plans)]

    def collect(self, handle: tuple[int, list]) -> list[StepResult]:
        step, refs = handle
        return gather(refs, self.config.step_timeout_s, f"step {step}", names=[f"attention rank {i}" for i in range(len(refs))])

    def recover(self, progress=lambda msg: None) -> None:
        """Replace the ranks after a fault: every rank actor of this epoch is killed (a dead or stalled
        one, and the live ones whose data plane still points at it), and a new set is created in the
        same placement groups on a new rendezvous (a new epoch: nothing waits on a dead peer). The
        ranks hold no request state the head cannot rebuild: it re-queues what was in flight."""
        t0 = time.monotonic()
        self._ranks.kill()
        self.recoveries += 1
        self._ranks = self._blueprint.spawn(progress, epoch=self.recoveries)
        self.recovery_seconds.append(time.monotonic() - t0)
        log.warning("ranks replaced (epoch %d) in %.1fs", self.recoveries, self.recovery_seconds[-1])

    def fence(self, faults: list[FaultyRank]) -> None:
        """Kill the faulty ranks' actors: a step waiting on one of them fails now (its peers' sockets
        close) instead of at the transfer or step deadline; `recover` then replaces the whole set."""
        ranks = self._ranks
        for f in faults:
            group = ranks.attention if f.kind == "attention" else ranks.experts
            if not 0 <= f.rank < len(group) or f.epoch not in (-1, ranks.epoch):
                continue              # out of range, or found in a set that has been replaced since
            ray.kill(group[f.rank])
            # Ray's kill asks politely first (SIGTERM, SIGKILL 5 s later), which a stopped process cannot
            # answer; where every rank runs on this machine, end it at once.
            index = f.rank if f.kind == "attention" else len(ranks.attention) + f.rank
            if len(self.nodes) == 1 and index < len(ranks.pids):
                try:
                    os.kill(ranks.pids[index], signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ranks.stop()
        for pg in self._blueprint.groups:
            remove_placement_group(pg)
        if self._owns_ray:
            ray.shutdown()

    def probe(self, timeout_s: float) -> list[FaultyRank]:
        """Every rank's `check_health` under one deadline: Ray fails the call to a dead actor at once; a
        stopped one never answers. Expert ranks answer on a thread of their own while their loop
        serves; attention ranks from their HEALTH_GROUP (cluster/rank_set.py creates them with it), beside
        a running step. An expert loop that has ended while the deployment is up is a fault too."""
        if self._closed:
            return []
        ranks = self._ranks               # one epoch's set, even if a recovery swaps it meanwhile
        calls = [("attention", i, a.check_health.options(concurrency_group=HEALTH_GROUP).remote())
                 for i, a in enumerate(ranks.attention)]
        calls += [("expert", i, e.check_health.remote()) for i, e in enumerate(ranks.experts)]
        ready, _ = ray.wait([ref for _, _, ref in calls], num_returns=len(calls), timeout=timeout_s)
        ready = set(ready)
        faults = []
        for kind, i, ref in calls:
            if ref not in ready:
                faults.append(FaultyRank(kind, i, FaultyRank.NOT_ANSWERING, f"no answer to a health check within {timeout_s:g}s"))
                continue
            try:
                ray.get(ref)
            except ray.exceptions.ActorUnavailableError as e:   # unreachable for now (Ray says it may come back)
                faults.append(FaultyRank(kind, i, FaultyRank.NOT_ANSWERING, _first_line(e)))
            except ray.exceptions.RayActorError as e:
                faults.append(FaultyRank(kind, i, FaultyRank.DEAD, _first_line(e)))
            except ray.exceptions.RayError as e:      # alive, but its health check raised
                faults.append(FaultyRank(kind, i, FaultyRank.NOT_ANSWERING, f"health check failed: {_first_line(e)}"))
        named = {(f.kind, f.rank) for f in faults}
        ended, _ = ray.wait(ranks.serve_refs, num_returns=len(ranks.serve_refs), timeout=0) if ranks.serve_refs else ([], [])
        faults += [FaultyRank("expert", i, FaultyRank.STOPPED_SERVING, "its serve loop ended")
                   for i, ref in enumerate(ranks.serve_refs) if ref in ended and ("expert", i) not in named]
        return [dataclasses.replace(f, epoch=ranks.epoch) for f in faults]

    # ---- inspection ----------------------------------------------------------------------
    def expert_trace(self, since: float = 0.0) -> list:
        """Expert-rank TraceEvents that started at or after `since` (wall clock)."""
        per_rank = gather([e.trace_events.remote(since) for e in self.experts], 30, "expert trace")
        return [event for events in per_rank for event in events]

    def health(self) -> list[dict]:
        return gather([a.check_health.remote() for a in self.attention + self.experts], 30, "health check")


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _this_node() -> NodeInventory:
    """The driver's own node (a private Ray has only this one), described without a Ray task."""
    me = ray.get_runtime_context().get_node_id()
    entry = next(n for n in ray.nodes() if n["NodeID"] == me)
    return node_from_ray(entry, {"hostname": socket.gethostname(), "gpus": [g.__dict__ for g in local_gpus()],
                                 "route_ifname": None, "route_source": None, "route_error": None})


def _rank_env(node: NodeInventory, host: str, cluster: bool) -> dict[str, str]:
    """Environment of the ranks on `node`. In a cluster, gloo and NCCL listen on the interface of the
    node's route to the rendezvous host (the driver's GLOO_SOCKET_IFNAME means nothing there)."""
    env = local_ray_env()
    if not cluster:
        env.setdefault("NCCL_SOCKET_IFNAME", os.environ.get("NCCL_SOCKET_IFNAME", env["GLOO_SOCKET_IFNAME"]))
        return env
    if node.route_error or not node.route_ifname:
        raise DeploymentError(f"data plane: node {node.address} ({node.hostname}) has no route to the rendezvous "
                              f"host {host}: {node.route_error or 'unknown interface'}")
    env["GLOO_SOCKET_IFNAME"] = env["NCCL_SOCKET_IFNAME"] = node.route_ifname
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)      # the private-Ray loopback setting
    return env


@dataclass(frozen=True)
class NodeThreads:
    """Torch threads of the ranks on one node (cluster/threads.py is the policy)."""

    attention: tuple[int, int]    # (layers of decode-sized steps, everything else)
    expert: int


def node_threads(config: EngineConfig, layout: RankLayout, node: NodeInventory, spec: ModelSpec) -> NodeThreads:
    a, e = layout.attention_nodes.count(node.node_id), layout.expert_nodes.count(node.node_id)
    per_rank = threads.rank_threads(int(node.cpus), a, e, config.micro_batches, config.threads_per_rank)
    full = threads.useful_threads(per_rank, spec.hidden_size, spec.moe_intermediate_size, config.threads_per_rank)
    small = threads.small_step_threads(layout.device, config.micro_batches, e, config.threads_per_rank, config.colocate)
    return NodeThreads((min(full, small or full), full), full)


def _ranks_on(layout: RankLayout, node_id: str) -> str:
    a = [str(i) for i, n in enumerate(layout.attention_nodes) if n == node_id]
    e = [str(i) for i, n in enumerate(layout.expert_nodes) if n == node_id]
    parts = ([f"attention ranks {', '.join(a)}"] if a else []) + ([f"expert ranks {', '.join(e)}"] if e else [])
    return "; ".join(parts) or "no ranks"


def _layout_lines(layout: RankLayout, by_id: dict, cluster: bool) -> list[str]:
    lines = [f"placement by {layout.mode}: {layout.device}, {layout.backend}, {layout.cpus_per_rank:g} CPU"
             + (f" + {layout.gpus_per_rank:g} GPU" if layout.gpus_per_rank else "") + " per rank"]
    for i in layout.nodes_used():
        n = by_id[i]
        via = f"; data plane via {n.route_ifname}" if cluster else ""
        lines.append(f"  node {n.address} ({n.hostname}): {layout.roles[i]} ({layout.reasons[i]}) -> {_ranks_on(layout, i)}{via}")
    return lines


def _check_reach(layout: RankLayout, by_id: dict, host: str, timeout_s: float) -> None:
    """Every rank node dials the rendezvous host and every other rank node; fail naming who cannot."""
    used = layout.nodes_used()
    if [by_id[i].route_source for i in used] == [host]:
        return        # one node, the driver's own
    driver = ReachProbe(host)
    probe = ray.remote(ReachProbe)
    agents = [probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(i, soft=False))
              .remote(by_id[i].route_source) for i in used]
    try:
        where = gather([a.address.remote() for a in agents], 60, "reachability probe",
                     [f"node {by_id[i].address}" for i in used])
        targets = [(f"the rendezvous host {host}", *driver.address())]
        targets += [(f"node {by_id[i].address} ({_ranks_on(layout, i)})", ip, port) for i, (ip, port) in zip(used, where)]
        results = gather([a.reach.remote([t for t in targets if t[1:] != tuple(w)], timeout_s) for a, w in zip(agents, where)],
                       60 + timeout_s * len(targets), "reachability probe", [f"node {by_id[i].address}" for i in used])
    finally:
        for a in agents:
            ray.kill(a)
        driver.close()
    problems = [f"node {by_id[i].address} ({_ranks_on(layout, i)}; interface {by_id[i].route_ifname}) cannot reach {f}"
                for i, failures in zip(used, results) for f in failures]
    if problems:
        raise DeploymentError("data plane: " + "; ".join(problems) + ". Rank nodes must reach each other and the "
                              "rendezvous host on any TCP port (gloo and NCCL listen on ephemeral ports)")


def build_engine(model_dir: str, config: EngineConfig, address: str | None = None, progress=lambda msg: None, *,
                 return_logits: bool = False, record_trace: bool = False, **start_options) -> Engine:
    deployment = Deployment.start(model_dir, config, address, progress, **start_options)
    return Engine(config, deployment.limits, deployment, return_logits=return_logits, record_trace=record_trace)
