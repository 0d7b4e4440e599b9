"""`shuttle cluster inventory`: what each node of a Ray cluster has and which role it gets.

    shuttle cluster inventory [--address auto|HOST:PORT|local] [--json] [deployment flags]

Joins the cluster (default: the one this node belongs to, as `ray start` left it), runs one small
task per node (hostname, NVML GPUs, route to this node), and prints each node's CPUs, GPUs,
declared role resources, data-plane interface and role, then where the ranks of the plan given by
the deployment flags (--attention-ranks, --expert-ranks, --cpus-per-rank, ...) would run — the
same decision `shuttle serve --address ...` makes. `--address local` describes this machine alone.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub) -> argparse.ArgumentParser:
    from shuttle.cli import add_engine_flags
    p = sub.add_parser("cluster", help="inspect the Ray cluster Shuttle would deploy on")
    verbs = p.add_subparsers(dest="verb", required=True)
    inv = verbs.add_parser("inventory", help="each node's CPUs, GPUs and role; where the plan's ranks would run")
    inv.add_argument("--address", default="auto", help="Ray cluster to inspect (default: auto; local: this machine alone)")
    inv.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="rank device to plan for")
    inv.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    inv.add_argument("--plan", default=None, help="a deployment plan file (flags override its values)")
    add_engine_flags(inv)
    inv.set_defaults(func=inventory)
    return p


def inventory(args: argparse.Namespace) -> int:
    import ray

    from cluster.inventory import gather_inventory
    from cluster.ray_env import start_ray
    from cluster.roles import PlacementError, plan_layout
    from shuttle.cli import engine_config
    from shuttle.plan_file import load_plan_values

    config = engine_config(args, load_plan_values(args.plan) if args.plan else None)
    local = args.address == "local"
    try:
        owns = start_ray(None if local else args.address)
    except ConnectionError as e:
        raise RuntimeError(f"no Ray cluster at --address {args.address} ({e}); start one with `ray up` or "
                           "`ray start --head`, or use --address local for this machine alone") from None
    try:
        host = "127.0.0.1" if local else ray.util.get_node_ip_address()
        nodes = gather_inventory(route_host=host)
        try:
            layout, problem = plan_layout(nodes, config.attention_ranks, config.expert_ranks,
                                          config.cpus_per_rank, args.device), None
        except PlacementError as e:
            layout, problem = None, str(e)
    finally:
        if owns:
            ray.shutdown()
    if args.json:
        out = {"rendezvous_host": host, "nodes": [], "plan": None, "problem": problem}
        for n in nodes:
            d = n.to_dict()
            if layout:
                d["role"], d["reason"] = layout.roles[n.node_id], layout.reasons[n.node_id]
            out["nodes"].append(d)
        if layout:
            out["plan"] = {"mode": layout.mode, "device": layout.device, "backend": layout.backend,
                           "cpus_per_rank": layout.cpus_per_rank, "gpus_per_rank": layout.gpus_per_rank,
                           "attention": [_address(nodes, i) for i in layout.attention_nodes],
                           "expert": [_address(nodes, i) for i in layout.expert_nodes]}
        print(json.dumps(out, indent=2))
    else:
        print(render(nodes, layout, problem, host, config))
    return 0 if layout else 1


def _address(nodes, node_id: str) -> str:
    return next(n.address for n in nodes if n.node_id == node_id)


def render(nodes, layout, problem: str | None, host: str, config) -> str:
    lines = [f"{len(nodes)} node(s); data-plane rendezvous on {host}", ""]
    for n in nodes:
        head = " (head)" if n.is_head else ""
        lines.append(f"node {n.address}{head}  {n.hostname}  id {n.node_id[:12]}")
        lines.append(f"  CPUs {n.cpus:g}   Ray GPUs {n.gpu_slots:g}")
        for g in n.gpus:
            bw = f", {g.mem_bandwidth_gbs:.0f} GB/s" if g.mem_bandwidth_gbs else ""
            lines.append(f"  GPU {g.index}: {g.name}, {g.memory_bytes / 2 ** 30:.1f} GiB{bw}")
        declared = [f"shuttle_attention: {n.attention_slots:g}"] if n.attention_slots else []
        declared += [f"shuttle_expert: {n.expert_slots:g}"] if n.expert_slots else []
        lines.append(f"  declared roles: {', '.join(declared) or 'none'}")
        route = n.route_ifname and f"{n.route_ifname} ({n.route_source})"
        lines.append(f"  data-plane interface: {route or 'unknown: ' + str(n.route_error)}")
        if layout:
            ranks = [f"attention {i}" for i, x in enumerate(layout.attention_nodes) if x == n.node_id]
            ranks += [f"expert {i}" for i, x in enumerate(layout.expert_nodes) if x == n.node_id]
            lines.append(f"  role: {layout.roles[n.node_id]} — {layout.reasons[n.node_id]}")
            lines.append(f"  ranks: {', '.join(ranks) or 'none'}")
        lines.append("")
    plan = f"{config.attention_ranks} attention + {config.expert_ranks} expert ranks"
    if layout:
        gpu = f" + {layout.gpus_per_rank:g} GPU" if layout.gpus_per_rank else ""
        lines.append(f"plan: {plan} by {layout.mode}; {layout.device}, {layout.backend}; "
                     f"{layout.cpus_per_rank:g} CPU{gpu} per rank")
    else:
        lines.append(f"plan: {plan} cannot be placed: {problem}")
    return "\n".join(lines)


if __name__ == "__main__":
    from shuttle.cli import main
    sys.exit(main(["cluster", *sys.argv[1:]]))
