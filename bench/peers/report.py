"""Summary, markdown table and bar chart of a run_peers.py result; also re-renders a saved result.

    .venv/bin/python bench/peers/report.py RESULT.json [--load-threshold X] [--png OUT.png]

Medians are taken over the rounds whose 1-minute load average stayed below the threshold while the
engines were measuring ("quiet" rounds). A round above it is kept in the JSON and listed, never
dropped silently; when no round is quiet the medians are of all rounds and the table says so.
"""

from __future__ import annotations

import argparse
import json
import statistics


def value_of(mode: str, record: dict) -> float:
    """tok/s (throughput: batch × new tokens / seconds of the timed call) or ms (time to first token)."""
    if mode == "ttft":
        return record["seconds"] * 1e3
    return record["batch"] * record["new_tokens"] / record["seconds"]


def summarize(result: dict, threshold: float | None = None) -> dict:
    mode = result["mode"]
    threshold = result["settings"]["load_threshold"] if threshold is None else threshold
    rounds = result["rounds"]
    quiet = [r["round"] for r in rounds if r["load"]["max_measuring"] is not None and r["load"]["max_measuring"] < threshold]
    used = quiet or [r["round"] for r in rounds]
    engines = [e for e in result["settings"]["engines"] if result["engines"][e]["status"] == "ok"]
    batches = result["settings"]["batches"]
    per_round = {e: {str(b): [None] * len(rounds) for b in batches} for e in engines}
    for i, r in enumerate(rounds):
        for e, run in r["engines"].items():
            for rec in run.get("results", []):
                if str(rec["batch"]) in per_round.get(e, {}):
                    per_round[e][str(rec["batch"])][i] = value_of(mode, rec)
    # every timed call of the used rounds together (rounds × repeats): on a noisy machine the median of
    # all calls says more than a median of 3 per-round medians
    calls = {e: {str(b): [] for b in batches} for e in engines}
    for r in rounds:
        if r["round"] not in used:
            continue
        for e, run in r["engines"].items():
            for rec in run.get("results", []):
                if str(rec["batch"]) in calls.get(e, {}):
                    calls[e][str(rec["batch"])] += [dict(rec, seconds=t) for t in rec.get("calls_s") or [rec["seconds"]]]
    pooled = {e: {b: value_of(mode, {**recs[0], "seconds": statistics.median(x["seconds"] for x in recs)}) if recs else None
                  for b, recs in per_batch.items()} for e, per_batch in calls.items()}
    pooled_n = {e: {b: len(recs) for b, recs in per_batch.items()} for e, per_batch in calls.items()}
    median, spread, ratio, ratio_rounds = {}, {}, {}, {}
    for e in engines:
        median[e], spread[e], ratio[e], ratio_rounds[e] = {}, {}, {}, {}
        for b in map(str, batches):
            vals = [per_round[e][b][i] for i, r in enumerate(rounds) if r["round"] in used and per_round[e][b][i] is not None]
            median[e][b] = statistics.median(vals) if vals else None
            spread[e][b] = [min(vals), max(vals)] if vals else None
            # speed relative to Shuttle in the same round: > 1 means this engine was faster
            rr = []
            for i in range(len(rounds)):
                mine, ours = per_round[e][b][i], per_round.get("shuttle", {}).get(b, [None] * len(rounds))[i]
                if mine is None or ours is None:
                    rr.append(None)
                else:
                    rr.append(mine / ours if mode == "throughput" else ours / mine)
            ratio_rounds[e][b] = rr
            used_rr = [x for i, x in enumerate(rr) if rounds[i]["round"] in used and x is not None]
            ratio[e][b] = statistics.median(used_rr) if used_rr else None
    # greedy outputs of the first prompt (first 16 tokens) beside Shuttle's, per round: a sanity check that
    # the engines compute the same model (float32 near-ties can still flip a token; llama.cpp reports none)
    agree = {}
    for e in engines:
        if e == "shuttle":
            continue
        checks = []
        for r in rounds:
            ours = {x["batch"]: x["first_output"] for x in r["engines"].get("shuttle", {}).get("results", [])}
            for x in r["engines"].get(e, {}).get("results", []):
                if x.get("first_output") is not None and ours.get(x["batch"]) is not None:
                    checks.append(x["first_output"] == ours[x["batch"]])
        agree[e] = f"{sum(checks)}/{len(checks)}" if checks else "n/a"
    return {"metric": "tok/s" if mode == "throughput" else "ms to first token", "load_threshold": threshold,
            "same_first_tokens_as_shuttle": agree,
            "quiet_rounds": quiet, "used_rounds": used, "all_rounds_loaded": not quiet and bool(rounds),
            "per_round": per_round, "median": median, "min_max": spread, "all_calls_median": pooled,
            "all_calls": pooled_n,
            "speed_vs_shuttle": ratio, "speed_vs_shuttle_per_round": ratio_rounds}


def table(result: dict, summary: dict) -> str:
    s, batches = result["settings"], result["settings"]["batches"]
    m = result["machine"]
    lines = [f"Peers, {result['mode']} ({summary['metric']}): bench Mixtral (h512 i1024 L8 E16 top-2, vocab 32000), "
             f"{s['dtype']}, prompt {s['prompt_len']} tokens, {s['new_tokens']} new tokens, greedy, {s['threads']} threads each",
             f"Machine: {m.get('cpu_model')}, {m.get('cores')} cores, flags {', '.join(m.get('flags', [])) or 'none of avx512/amx'}, "
             f"torch {m.get('torch')}, {result['started']}"]
    loads = "; ".join(f"r{r['round']}: {r['load']['max_measuring']:.2f} (other processes ~{r['load']['other_cores_mean_measuring']} cores)"
                      if r["load"]["max_measuring"] is not None else f"r{r['round']}: n/a" for r in result["rounds"])
    if summary["all_rounds_loaded"]:
        lines.append(f"NO quiet round (1-min load >= {summary['load_threshold']:g} in each): medians of ALL "
                     f"{len(summary['used_rounds'])} rounds, taken on a loaded machine. Loads: {loads}")
    else:
        lines.append(f"Medians of {len(summary['used_rounds'])} quiet round(s) {summary['used_rounds']} of "
                     f"{len(result['rounds'])} (1-min load < {summary['load_threshold']:g}). Loads: {loads}")
    lines.append("")
    lines.append("| engine | " + " | ".join(f"batch {b}" for b in batches) + " |")
    lines.append("|---|" + "---|" * len(batches))
    for e in summary["median"]:
        cells = []
        for b in map(str, batches):
            v, r = summary["median"][e][b], summary["speed_vs_shuttle"][e][b]
            if v is None:
                cells.append("—")
            else:
                cells.append(f"{v:.1f}" + ("" if e == "shuttle" or r is None else f" ({r:.2f}× Shuttle)"))
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    pooled = summary.get("all_calls_median") or {}
    if any(n > len(summary["used_rounds"]) for per in summary.get("all_calls", {}).values() for n in per.values()):
        lines.append("\nEvery timed call of those rounds together (median; calls per engine and batch: "
                     + ", ".join(f"{e} {max(per.values())}" for e, per in summary["all_calls"].items()) + "):\n")
        lines.append("| engine | " + " | ".join(f"batch {b}" for b in batches) + " |")
        lines.append("|---|" + "---|" * len(batches))
        for e, per in pooled.items():
            lines.append(f"| {e} | " + " | ".join("—" if per[str(b)] is None else f"{per[str(b)]:.1f}" for b in batches) + " |")
    if "shuttle" in summary["median"] and summary.get("same_first_tokens_as_shuttle"):
        lines.append("\nSame first 16 greedy tokens of prompt 0 as Shuttle (calls that match / compared): "
                     + ", ".join(f"{e} {v}" for e, v in summary["same_first_tokens_as_shuttle"].items()))
    for e, info in result["engines"].items():
        if info["status"] != "ok":
            lines.append(f"\n{e}: {info['status']}")
    errors = [(r["round"], e, err) for r in result["rounds"] for e, run in r["engines"].items() for err in run.get("errors", [])]
    for rnd, e, err in errors:
        lines.append(f"\nround {rnd} {e}: {err.get('stage')} batch {err.get('batch', '-')}: {err.get('error')}")
    return "\n".join(lines)


def plot(result: dict, summary: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    batches = [str(b) for b in result["settings"]["batches"]]
    engines = list(summary["median"])
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(batches), 4.2))
    width = 0.8 / max(1, len(engines))
    for k, e in enumerate(engines):
        xs = [i + (k - (len(engines) - 1) / 2) * width for i in range(len(batches))]
        med = [summary["median"][e][b] or 0 for b in batches]
        lo = [med[i] - (summary["min_max"][e][b] or [0, 0])[0] if summary["median"][e][b] else 0 for i, b in enumerate(batches)]
        hi = [(summary["min_max"][e][b] or [0, 0])[1] - med[i] if summary["median"][e][b] else 0 for i, b in enumerate(batches)]
        ax.bar(xs, med, width, yerr=[lo, hi], capsize=2, label=e)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel(summary["metric"] + (" (lower is better)" if result["mode"] == "ttft" else " (higher is better)"))
    s = result["settings"]
    loaded = " — LOADED machine" if summary["all_rounds_loaded"] else ""
    ax.set_title(f"{s['dtype']}, {s['threads']} threads, median of {len(summary['used_rounds'])} round(s){loaded}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result")
    ap.add_argument("--load-threshold", type=float)
    ap.add_argument("--png", help="write the chart here too")
    args = ap.parse_args()
    with open(args.result) as f:
        result = json.load(f)
    summary = summarize(result, args.load_threshold)
    print(table(result, summary))
    if args.png:
        plot(result, summary, args.png)


if __name__ == "__main__":
    main()
