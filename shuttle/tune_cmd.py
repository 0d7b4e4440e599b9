"""`shuttle tune`: profile the pipeline, search deployment plans, draw the ping-pong.

    shuttle tune profile --model DIR [--threads 1 2] [--batches ...] [--contexts ...] --out profile.json
    shuttle tune plan --profile profile.json --tpot-ms 200 [--ctx 128] --out plan.yaml       # this machine
    shuttle tune plan --model DIR|PRESET --attention-gpus H20 --expert-gpus L40S,H100 \\
                      --tpot-ms 150 [--ctx 1024] [--gpus-file my_gpus.yaml] --out plan.yaml     # a GPU cluster
    shuttle tune timeline --profile profile.json --plan plan.yaml [--measure --model DIR] --out timeline.png

The plan file holds the EngineConfig values under `engine:` (what `shuttle run --plan` and
`shuttle serve --plan` read; flags override them), and the devices, the prediction and the reasons
under `plan:`, `prediction:` and `why:`.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from shuttle.plan_file import load_plan_values
from tuner.costs import RooflineCosts
from tuner.hardware import load_catalogue
from tuner.local import search_local
from tuner.model_shape import PRESETS, resolve_model
from tuner.plan_file import plan_document, reasons, write_plan
from tuner.profile import Profile
from tuner.search import Plan, Requirements, SearchSpace, search, simulate_plan


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        a, e, m, b = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not A,E,M,B (four integers, e.g. 1,2,1,8)") from None
    if min(a, e, m, b) < 1 or b < a * m:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be ≥ 1 and B ≥ A·M")
    return a, e, m, b


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("tune", help="profile, search deployment plans, draw the ping-pong timeline")
    tsub = p.add_subparsers(dest="tune_command", required=True)

    pr = tsub.add_parser("profile", help="measure stage times on this machine and fit the cost model")
    pr.add_argument("--model", required=True, help="checkpoint directory")
    pr.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    pr.add_argument("--threads", type=_ints, default=None, help="thread counts per rank to profile (default: all cores, and 1)")
    pr.add_argument("--batches", type=_ints, default=(1, 4, 8, 16, 32, 64), help="sequences per micro-batch")
    pr.add_argument("--contexts", type=_ints, default=(16, 128), help="prompt lengths")
    pr.add_argument("--steps", type=int, default=6, help="traced decode steps per configuration")
    pr.add_argument("--address", default=None, help="join this Ray cluster (default: a private local Ray)")
    pr.add_argument("--quantile", type=float, default=0.5,
                    help="quantile of span and step times per sample (0.5: medians; 0.25 filters other jobs on a shared machine)")
    pr.add_argument("--rescale-speed", action="store_true",
                    help="rescale every sample to the machine's median speed probe (for VMs whose speed drifts; see docs/tuning.md)")
    pr.add_argument("--calibrate", type=_shape, nargs="*", default=[(1, 2, 1, 8), (1, 1, 2, 16), (2, 1, 1, 8), (1, 2, 2, 16)], metavar="A,E,M,B",
                    help="multi-rank deployments run whole to calibrate the interference terms (default: 1,2,1,8 1,1,2,16 2,1,1,8 1,2,2,16; "
                         "none: --calibrate with no value)")
    pr.add_argument("--out", default="profile.json")
    pr.set_defaults(func=cmd_profile)

    pl = tsub.add_parser("plan", help="search deployment plans; write the best as a plan file")
    src = pl.add_mutually_exclusive_group(required=True)
    src.add_argument("--profile", help="plan for this machine from its profile (ranks share its cores)")
    src.add_argument("--model", help=f"plan for GPUs of the catalogue: a checkpoint directory or a preset ({', '.join(PRESETS)})")
    pl.add_argument("--attention-gpus", type=_names, default=None, help="GPU types for attention ranks (default: all)")
    pl.add_argument("--expert-gpus", type=_names, default=None, help="GPU types for expert ranks (default: all)")
    pl.add_argument("--gpus-file", default=None, help="YAML extending/overriding the GPU catalogue")
    pl.add_argument("--list-gpus", action="store_true", help="print the catalogue and exit")
    pl.add_argument("--tp", type=_ints, default=(1, 2, 4, 8), help="tensor-parallel degrees to try")
    pl.add_argument("--attention-ranks", type=_ints, default=None, help="n_a values (default: 1..16; 1..4 for --profile)")
    pl.add_argument("--expert-ranks", type=_ints, default=None, help="n_e values (default: divisors of the expert count; 1..4 for --profile)")
    pl.add_argument("--micro-batches", type=_ints, default=None, help="m values (default: 1..6; 1..4 for --profile)")
    pl.add_argument("--batches", type=_ints, default=None, help="global batch sizes B to try")
    pl.add_argument("--tpot-ms", type=float, required=False, default=None, help="time-per-output-token SLO (required unless --list-gpus)")
    pl.add_argument("--ctx", type=float, default=None, help="mean context length of decoding sequences (default 1024; 128 for --profile)")
    pl.add_argument("--dtype-bytes", type=int, default=2, help="weight/KV bytes per element for GPU plans")
    pl.add_argument("--balance-limit", type=float, default=2.0, help="reject plans with max(T_a,T_e)/min(T_a,T_e) above this")
    pl.add_argument("--allow-m1", action="store_true", help="allow plans without ping-pong (m=1); implied by --profile")
    pl.add_argument("--skew", type=float, default=0.0, help="expert popularity ∝ 1/(i+1)^skew in the simulation (0: uniform)")
    pl.add_argument("--top", type=int, default=10, help="rows in the ranked table")
    pl.add_argument("--out", default="plan.yaml", help="plan file to write ('-' for none)")
    pl.set_defaults(func=cmd_plan)

    tl = tsub.add_parser("timeline", help="draw one decode iteration as a PNG Gantt chart (predicted, and measured)")
    tl.add_argument("--profile", required=True, help="profile of this machine (the prediction)")
    tl.add_argument("--plan", default=None, help="plan file whose shape to draw (else the shape flags)")
    tl.add_argument("--attention-ranks", type=int, default=1)
    tl.add_argument("--expert-ranks", type=int, default=1)
    tl.add_argument("--micro-batches", type=int, default=2)
    tl.add_argument("--batch", type=int, default=None, help="global batch B (default: the plan's, else 16)")
    tl.add_argument("--ctx", type=float, default=64, help="prompt length / context")
    tl.add_argument("--skew", type=float, default=0.0)
    tl.add_argument("--measure", action="store_true", help="also run the shape for real (needs --model) and draw its trace")
    tl.add_argument("--model", default=None, help="checkpoint directory for --measure")
    tl.add_argument("--out", default="timeline.png")
    tl.set_defaults(func=cmd_timeline)
    return p


def say(msg: str) -> None:
    print(f"[shuttle tune] {msg}", file=sys.stderr, flush=True)


# ---- profile -----------------------------------------------------------------------------------
def cmd_profile(args) -> int:
    from tuner.profiler import run_profile          # Ray and torch: only for this command
    profile = run_profile(args.model, args.dtype, list(args.threads) if args.threads else None, tuple(args.batches),
                          tuple(args.contexts), args.steps, progress=say, address=args.address,
                          quantile=args.quantile, calibration=tuple(args.calibrate), rescale_speed=args.rescale_speed)
    profile.save(args.out)
    print("\n".join(profile.report()))
    say(f"wrote {args.out}")
    return 0


# ---- plan --------------------------------------------------------------------------------------
def cmd_plan(args) -> int:
    if args.list_gpus:
        for g in load_catalogue(args.gpus_file).values():
            print(g.describe() + ("  (this machine)" if g.local else ""))
        return 0
    if args.tpot_ms is None or args.tpot_ms <= 0:
        raise ValueError("--tpot-ms (a positive time-per-output-token SLO in ms) is required")
    if args.profile:
        return _plan_local(args)
    return _plan_catalogue(args)


def _plan_catalogue(args) -> int:
    shape = resolve_model(args.model)
    catalogue = load_catalogue(args.gpus_file)
    space = SearchSpace(attention_gpus=args.attention_gpus or tuple(catalogue), expert_gpus=args.expert_gpus or tuple(catalogue),
                        tp=args.tp, **({"attention_ranks": args.attention_ranks} if args.attention_ranks else {}),
                        **({"expert_ranks": args.expert_ranks} if args.expert_ranks else {}),
                        **({"micro_batches": args.micro_batches} if args.micro_batches else {}),
                        **({"batches": args.batches} if args.batches else {}))
    req = Requirements(tpot_slo_s=args.tpot_ms / 1e3, ctx=args.ctx or 1024, dtype_bytes=args.dtype_bytes,
                       balance_limit=args.balance_limit, allow_m1=args.allow_m1)
    costs_for = lambda g, tp: RooflineCosts(shape, g, tp, args.dtype_bytes)   # noqa: E731
    result = search(shape, catalogue, space, req, costs_for)
    say(f"{shape.name}: {shape.total_params() / 1e9:.0f}B parameters; searched {result.candidates} candidate plans "
        f"({result.evaluated} evaluated) in {result.seconds:.2f}s")
    _print_table(result.plans[:args.top], per_cost=True)
    best = result.best
    sim = simulate_plan(shape, catalogue, best, req, costs_for, skew=args.skew)
    why = reasons(best, result)
    why.append(f"simulated iteration (per rank, skew {args.skew:g}): {sim.iteration_s * 1e3:.2f} ms "
               f"(closed form {best.t_iter * 1e3:.2f} ms)")
    print("\n".join(why))
    _write_plan(args.out, plan_document(best, req, why, sim.iteration_s, gpu=True))
    return 0


def _plan_local(args) -> int:
    profile = Profile.load(args.profile)
    req = Requirements(tpot_slo_s=args.tpot_ms / 1e3, ctx=args.ctx or 128, dtype_bytes=profile.dtype_bytes,
                       balance_limit=args.balance_limit, allow_m1=True)
    kw = {}
    if args.micro_batches:
        kw["micro_batches"] = args.micro_batches
    if args.batches:
        kw["batches"] = args.batches
    result = search_local(profile, req, max_attention=max(args.attention_ranks or (4,)), max_expert=max(args.expert_ranks or (4,)),
                          skew=args.skew, **kw)
    say(f"{profile.model.name} on {profile.machine}: simulated {result.evaluated} of {result.candidates} candidates "
        f"in {result.seconds:.2f}s")
    _print_table(result.plans[:args.top], per_cost=False)
    why = reasons(result.best, result)
    print("\n".join(why))
    _write_plan(args.out, plan_document(result.best, req, why, result.best.t_iter, gpu=False, dtype=profile.dtype))
    return 0


def _write_plan(path: str, doc: dict) -> None:
    if path == "-":
        return
    write_plan(path, doc)
    say(f"wrote {path} (use: shuttle run --plan {path} … / shuttle serve --plan {path})")


def _print_table(plans: list[Plan], per_cost: bool) -> None:
    head = "| # | attention | expert | m | B | T_a ms | T_e ms | T_c ms | TPOT ms | tokens/s |" + (" cost | tokens/s/cost |" if per_cost else "")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for i, p in enumerate(plans, 1):
        att = f"{p.n_a}×{p.attention_gpu}" + (f"×tp{p.tp_a}" if per_cost else "")
        exp = f"{p.n_e}×{p.expert_gpu}" + (f"×tp{p.tp_e}" if per_cost else "")
        row = (f"| {i} | {att} | {exp} | {p.m} | {p.batch} | {p.t_a * 1e3:.3f} | {p.t_e * 1e3:.3f} | {p.t_c * 1e3:.3f} | "
               f"{p.t_iter * 1e3:.1f} | {p.tokens_per_s:.0f} |")
        if per_cost:
            row += f" {p.cost:.2f} | {p.per_cost:.0f} |"
        print(row)


# ---- timeline ----------------------------------------------------------------------------------
def cmd_timeline(args) -> int:
    from tuner.timeline import decode_timelines, draw_timeline      # Ray and matplotlib: only for this command
    profile = Profile.load(args.profile)
    n_a, n_e, m, batch = args.attention_ranks, args.expert_ranks, args.micro_batches, args.batch
    if args.plan:
        values = load_plan_values(args.plan)
        n_a, n_e, m = values.get("attention_ranks", n_a), values.get("expert_ranks", n_e), values.get("micro_batches", m)
        with open(args.plan) as f:
            batch = batch or (yaml.safe_load(f).get("plan") or {}).get("global_batch")
    batch = batch or 16
    if args.measure and not args.model:
        raise ValueError("--measure needs --model DIR (the checkpoint to run)")
    panels, sim, measured = decode_timelines(profile, n_a, n_e, m, batch, args.ctx, args.skew,
                                             model_dir=args.model if args.measure else None, progress=say)
    if measured is not None:
        say(f"predicted {sim.iteration_s * 1e3:.1f} ms, measured {measured.step_s * 1e3:.1f} ms per decode step")
    info = draw_timeline(panels, args.out, title=f"{profile.model.name}: one decode iteration")
    say(f"wrote {args.out} ({sum(info['bars'].values())} bars on lanes {', '.join(info['lanes'])})")
    return 0
