"""Which node runs which rank: node roles, rank slots, device and transfer backend. Pure policy,
no Ray: it reads NodeInventory records and returns a RankLayout.

How roles are chosen, in order:
1. declared — some node advertises `shuttle_attention` / `shuttle_expert` resources: attention
   ranks go only to nodes with `shuttle_attention`, expert ranks only to nodes with
   `shuttle_expert`, one unit per rank (a node may declare both).
2. GPU inventory — no declared roles, some node has GPUs: GPU models are ranked by memory
   bandwidth per FLOP (decode attention reads the KV cache: bytes per FLOP is what it needs;
   experts batch tokens from every attention rank: FLOPs). The model with the most bandwidth per
   FLOP serves attention, the others serve experts, expert ranks filling the most FLOPs first.
   With one GPU model (or one whose peak is unknown) every GPU node serves both.
3. CPU slots — a CPU-only cluster: each node has floor(CPU / cpus_per_rank) slots. Expert ranks
   take the nodes with the most slots, attention ranks the others; if that split cannot hold the
   plan, ranks share nodes.

Device and backend: ranks run on "cuda" when every node they land on has GPUs. Each rank gets a
whole GPU when there are enough (NCCL between them); otherwise ranks share GPUs with a fraction
of one each, and the data plane is gloo (NCCL needs one GPU per rank).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cluster.inventory import NodeInventory, gpu_peak

ATTENTION, EXPERT, BOTH, NONE = "attention", "expert", "attention+expert", "-"


class PlacementError(ValueError):
    """The cluster cannot hold the plan; the message says what is missing where."""


@dataclass(frozen=True)
class RankLayout:
    mode: str                        # "declared" | "gpu-inventory" | "cpu-slots"
    roles: dict                      # node_id -> ATTENTION | EXPERT | BOTH | NONE
    reasons: dict                    # node_id -> why it got that role
    attention_nodes: tuple           # node_id of each attention rank
    expert_nodes: tuple              # node_id of each expert rank
    device: str                      # "cpu" | "cuda"
    backend: str                     # "gloo" | "nccl"
    cpus_per_rank: float
    gpus_per_rank: float             # 0 on CPU; < 1 when ranks share a GPU

    def bundle(self, side: str) -> dict:
        """The Ray resources one rank of `side` ("attention" | "expert") reserves."""
        b = {"CPU": self.cpus_per_rank}
        if self.gpus_per_rank:
            b["GPU"] = self.gpus_per_rank
        if self.mode == "declared":
            b["shuttle_" + side] = 1.0
        return b

    def nodes_used(self) -> list[str]:
        return list(dict.fromkeys(self.attention_nodes + self.expert_nodes))


def plan_layout(nodes: list[NodeInventory], n_attention: int, n_expert: int, cpus_per_rank: float = 0.0,
                device: str = "auto") -> RankLayout:
    """Assign every rank a node. `cpus_per_rank` 0: share the chosen nodes' CPUs evenly, at most 1 each.
    `device` "auto" picks cuda where the ranks' nodes have GPUs, "cpu" ignores GPUs."""
    if device not in ("auto", "cpu", "cuda"):
        raise PlacementError(f"device must be auto, cpu or cuda, got {device!r}")
    nodes = sorted(nodes, key=lambda n: (not n.is_head, n.address, n.node_id))
    if not nodes:
        raise PlacementError("the Ray cluster has no alive node")
    use_gpus = device != "cpu" and any(n.gpu_slots >= 1 for n in nodes)
    if device == "cuda" and not use_gpus:
        raise PlacementError("device cuda: no node of the cluster has a GPU (Ray's GPU resource is 0 everywhere)")
    if any(n.declares_role for n in nodes):
        roles, reasons, att, exp = _declared(nodes)
        mode = "declared"
        for side, have in (("shuttle_attention", att), ("shuttle_expert", exp)):
            if not have:
                raise PlacementError(f"roles are declared with Ray resources, but no node declares {side}: add it to "
                                     "the nodes for that side (`ray start --resources`), or declare no role at all")
    elif use_gpus:
        roles, reasons, att, exp = _by_gpu(nodes)
        mode = "gpu-inventory"
    else:
        roles, reasons, att, exp = _by_cpu(nodes, n_attention, n_expert, cpus_per_rank)
        mode = "cpu-slots"
    if use_gpus and mode == "declared" and not all(n.gpu_slots >= 1 for n in att + exp):
        if device == "cuda":
            bare = [n.address for n in att + exp if n.gpu_slots < 1]
            raise PlacementError(f"device cuda: role nodes {', '.join(bare)} have no GPU")
        use_gpus = False
    if use_gpus:
        return _fill_gpus(mode, roles, reasons, att, exp, n_attention, n_expert, cpus_per_rank)
    return _fill_cpus(mode, roles, reasons, att, exp, n_attention, n_expert, cpus_per_rank)


# ---- roles --------------------------------------------------------------------------------
def _declared(nodes):
    roles, reasons = {}, {}
    for n in nodes:
        parts = [f"shuttle_attention: {n.attention_slots:g}"] if n.attention_slots else []
        parts += [f"shuttle_expert: {n.expert_slots:g}"] if n.expert_slots else []
        roles[n.node_id] = {(True, True): BOTH, (True, False): ATTENTION, (False, True): EXPERT,
                            (False, False): NONE}[(n.attention_slots > 0, n.expert_slots > 0)]
        reasons[n.node_id] = "declared " + ", ".join(parts) if parts else "declares no shuttle role resource"
    return (roles, reasons, [n for n in nodes if n.attention_slots > 0], [n for n in nodes if n.expert_slots > 0])


def _by_gpu(nodes):
    roles, reasons = {}, {}
    gpu_nodes = [n for n in nodes if n.gpu_slots >= 1]
    for n in nodes:
        if n not in gpu_nodes:
            roles[n.node_id], reasons[n.node_id] = NONE, "no GPU (the cluster has GPU nodes)"
    models = {}
    for n in gpu_nodes:
        models.setdefault(n.gpu_name or "unknown GPU", []).append(n)
    peaks = {m: _peak(m, ns) for m, ns in models.items()}
    unknown = [m for m, (tflops, bw) in peaks.items() if tflops is None or bw is None]
    if len(models) == 1 or unknown:
        why = (f"one GPU model ({next(iter(models))})" if len(models) == 1 else
               f"no peak FLOP/s or bandwidth known for {', '.join(unknown)}: declare roles with shuttle_attention/shuttle_expert")
        for n in gpu_nodes:
            roles[n.node_id], reasons[n.node_id] = BOTH, why
        return roles, reasons, gpu_nodes, gpu_nodes
    ratio = {m: bw / tflops for m, (tflops, bw) in peaks.items()}      # GB/s per TFLOP/s = bytes per kFLOP
    attention_model = max(ratio, key=lambda m: (ratio[m], peaks[m][1]))
    for m, ns in models.items():
        tflops, bw = peaks[m]
        role = ATTENTION if m == attention_model else EXPERT
        why = (f"{m}: {bw:.0f} GB/s / {tflops:.0f} TFLOP/s = {ratio[m]:.1f} bytes per kFLOP, "
               + ("the most bandwidth per FLOP" if role == ATTENTION else f"less than {attention_model}'s {ratio[attention_model]:.1f}"))
        for n in ns:
            roles[n.node_id], reasons[n.node_id] = role, why
    att = models[attention_model]
    exp = sorted((n for m, ns in models.items() if m != attention_model for n in ns),
                 key=lambda n: -peaks[n.gpu_name or "unknown GPU"][0])            # most FLOPs first
    return roles, reasons, att, exp


def _peak(model: str, nodes) -> tuple[float | None, float | None]:
    tflops, bw = gpu_peak(model)
    measured = [g.mem_bandwidth_gbs for n in nodes for g in n.gpus if g.name == model and g.mem_bandwidth_gbs]
    return tflops, (max(measured) if measured else bw)


def _slots(n: NodeInventory, cpus_per_rank: float) -> int:
    return int(math.floor(n.cpus / cpus_per_rank + 1e-9)) if cpus_per_rank else 0


def _by_cpu(nodes, n_attention, n_expert, cpus_per_rank):
    roles, reasons = {}, {}
    per_rank = cpus_per_rank or 1.0
    ranked = sorted(nodes, key=lambda n: -_slots(n, per_rank))
    if len(nodes) > 1:
        exp, att, covered = [], [], 0
        for n in ranked:    # experts take the nodes with the most slots until they fit, attention the rest
            if covered < n_expert:
                exp.append(n)
                covered += _slots(n, per_rank)
            else:
                att.append(n)
        if covered >= n_expert and sum(_slots(n, per_rank) for n in att) >= n_attention:
            for n in nodes:
                role = EXPERT if n in exp else ATTENTION if n in att else NONE
                roles[n.node_id] = role
                reasons[n.node_id] = (f"{n.cpus:g} CPUs = {_slots(n, per_rank)} slots of {per_rank:g}; "
                                      + ("experts take the nodes with the most slots" if role == EXPERT else "attention takes the rest"))
            return roles, reasons, att, exp
    why = "the only node" if len(nodes) == 1 else "too few CPU slots to give attention and experts their own nodes"
    for n in nodes:
        roles[n.node_id], reasons[n.node_id] = BOTH, f"{n.cpus:g} CPUs; {why}"
    return roles, reasons, nodes, nodes


# ---- filling slots ------------------------------------------------------------------------
def _fill(side: str, n_ranks: int, candidates, slots: dict, used: dict, room: dict | None = None) -> list[str]:
    """Ranks of one side fill the candidate nodes in order, up to `slots` of that side per node and,
    with `room`, up to room[node] ranks of both sides together (`used` counts them)."""
    out, mine = [], {}
    for n in candidates:
        i = n.node_id
        while len(out) < n_ranks and mine.get(i, 0) < slots[i] and (room is None or used.get(i, 0) < room[i]):
            out.append(i)
            mine[i] = mine.get(i, 0) + 1
            used[i] = used.get(i, 0) + 1
    if len(out) < n_ranks:
        have = ", ".join(f"{n.address} {slots[n.node_id] if room is None else min(slots[n.node_id], room[n.node_id])}"
                         for n in candidates) or "none"
        raise PlacementError(f"{n_ranks} {side} ranks do not fit: slots for {side} ranks per node: {have}"
                             + ("" if room is None else " (shared with the attention ranks placed there)" if side == EXPERT else ""))
    return out


def _fill_cpus(mode, roles, reasons, att, exp, n_attention, n_expert, cpus_per_rank):
    used: dict = {}
    if mode == "declared":    # the role units are the slots; each side counts its own resource
        a = _fill(ATTENTION, n_attention, att, {n.node_id: int(n.attention_slots) for n in att}, used)
        e = _fill(EXPERT, n_expert, exp, {n.node_id: int(n.expert_slots) for n in exp}, used)
    else:
        if cpus_per_rank or BOTH not in roles.values():
            room = {n.node_id: _slots(n, cpus_per_rank or 1.0) for n in att + exp}
        else:                 # ranks share the nodes' CPUs, in proportion to them
            total = sum(n.cpus for n in att) or 1.0
            room = {n.node_id: math.ceil((n_attention + n_expert) * n.cpus / total) for n in att}
        a = _fill(ATTENTION, n_attention, att, room, used, room)
        e = _fill(EXPERT, n_expert, exp, room, used, room)
    return RankLayout(mode, roles, reasons, tuple(a), tuple(e), "cpu", "gloo",
                      cpus_per_rank or _even_cpus(att + exp, used), 0.0)


def _even_cpus(nodes, taken: dict) -> float:
    """CPUs per rank when not given: each node's CPUs shared by its ranks, at most one each."""
    cpus = {n.node_id: n.cpus for n in nodes}
    share = min([1.0] + [cpus[i] / k for i, k in taken.items() if k])
    return max(0.01, math.floor(share * 100) / 100)


def _fill_gpus(mode, roles, reasons, att, exp, n_attention, n_expert, cpus_per_rank):
    gpus = {n.node_id: int(n.gpu_slots) for n in att + exp}
    same_nodes = {n.node_id for n in att} & {n.node_id for n in exp}
    # Ranks per GPU: 1 if every rank can have its own, else the fewest that make them fit.
    if same_nodes == {n.node_id for n in att} == {n.node_id for n in exp}:
        share = math.ceil((n_attention + n_expert) / sum(gpus.values()))
    else:
        share = max(math.ceil(n_attention / sum(gpus[n.node_id] for n in att)),
                    math.ceil(n_expert / sum(gpus[n.node_id] for n in exp)),
                    math.ceil((n_attention + n_expert) / sum(gpus.values())))
    room = {i: g * share for i, g in gpus.items()}       # ranks per node, both sides together
    used: dict = {}
    if mode == "declared":
        a = _fill(ATTENTION, n_attention, att, {n.node_id: int(n.attention_slots) for n in att}, used, room)
        e = _fill(EXPERT, n_expert, exp, {n.node_id: int(n.expert_slots) for n in exp}, used, room)
    else:
        a = _fill(ATTENTION, n_attention, att, room, used, room)
        e = _fill(EXPERT, n_expert, exp, room, used, room)
    return RankLayout(mode, roles, reasons, tuple(a), tuple(e), "cuda", "nccl" if share == 1 else "gloo",
                      cpus_per_rank or _even_cpus(att + exp, used), round(1.0 / share, 4))
