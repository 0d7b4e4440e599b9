"""Prediction accuracy of `shuttle tune`: profile once, then predict and measure several deployment shapes.

The model: Mixtral format, hidden 256, intermediate 512, 6 layers, 8 experts top-2, 4 heads / 2 KV
heads, vocab 4096, float32, random weights (built once into --cache). For each shape (A attention
ranks, E expert ranks, m micro-batches, global batch B): the simulator's decode step time from the
profile (`Profile.predict`, tuner/profile.py), then B prompts of --ctx tokens run for real and the median
decode step is timed. Throughput = B / step time. Error = predicted / measured - 1.

Rounds: this VM's speed wanders by tens of percent over seconds to minutes. With --reprofile (or
no saved profile) every round is a profile pass followed by every shape once, so the profile and the
measurements see the same spells; the profile is the median of its passes (`Profile.merge`), each
shape's measurement its median round. The machine's speed probe (tuner/speed.py) is
printed with every round, to show the drift.

    .venv/bin/python bench/tune_accuracy.py [--shapes 1,1,1,8 1,1,2,32 ...] [--profile FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
for k, v in {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
             "GLOO_SOCKET_IFNAME": "lo", "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(k, v)

from bench.random_mixtral import build_random_mixtral  # noqa: E402
from cluster.ray_env import start_ray  # noqa: E402
from tuner.measure import measure_decode  # noqa: E402
from tuner.profile import Profile  # noqa: E402
from tuner.profiler import run_profile  # noqa: E402
from tuner.speed import speed_probe  # noqa: E402
from tuner.timeline import draw_timeline  # noqa: E402
from tuner.trace import quantile  # noqa: E402

# Not the profile's calibration runs (1,2,1,8, 1,1,2,16, 2,1,1,8 and 1,2,2,16): every row here is predicted, not fitted.
SHAPES = ["1,1,1,8", "1,1,1,32", "2,1,1,16", "1,1,2,32", "1,2,1,16", "1,1,3,48", "2,1,2,32", "1,2,2,64", "2,2,2,32"]


def build_model(path: str) -> str:
    return build_random_mixtral(path, vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                                num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                num_experts_per_tok=2, max_position_embeddings=2048)


def stage_medians(spans, q: float) -> dict:
    """q-quantile duration (ms) of each span kind: where a prediction and a measurement part ways."""
    out = {}
    for kind in ("attention", "expert", "dispatch", "combine", "head", "wait"):
        d = [s.end - s.start for s in spans if s.kind == kind and (kind != "head" or s.micro_batch < 0)]
        if d:
            out[kind] = quantile(d, q) * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="A,E,M,B")
    ap.add_argument("--ctx", type=int, default=64, help="prompt length")
    ap.add_argument("--steps", type=int, default=24, help="timed decode steps per shape")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all shapes; each shape's median round is reported")
    ap.add_argument("--profile", default=os.path.join(ROOT, "bench", "results", "tune_profile.json"))
    ap.add_argument("--reprofile", action="store_true", help="profile again even if --profile exists")
    ap.add_argument("--quantile", type=float, default=0.5,
                    help="quantile of span and step times on both sides (0.5: medians. A low quantile filters other jobs "
                         "but biases the prediction fast: the sum of each stage's 0.25-quantile is below the 0.25-quantile "
                         "of their sum; measured 15-28%% on the m=1 rows)")
    ap.add_argument("--settle-s", type=float, default=10.0, help="seconds to let Ray settle before measuring")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/shuttle/bench-mixtral-h256-e8"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "tune_accuracy.json"))
    ap.add_argument("--timeline", default=os.path.join(ROOT, "docs", "tune_timeline.png"),
                    help="draw predicted vs measured for the first shape with m ≥ 2")
    args = ap.parse_args()
    say = lambda msg: print(f"[accuracy] {msg}", file=sys.stderr, flush=True)   # noqa: E731
    model_dir = build_model(args.cache)
    # One Ray for every deployment, given time to settle: a fresh Ray's daemons take CPU for seconds.
    start_ray()
    time.sleep(args.settle_s)
    shapes = [tuple(int(x) for x in text.split(",")) for text in args.shapes]
    runs: dict[tuple, list] = {shape: [] for shape in shapes}
    reprofile = args.reprofile or not os.path.isfile(args.profile)
    passes = []
    t0 = time.time()
    # Rounds: (a profile pass, then every shape) × repeats. This VM's speed wanders by tens of percent
    # over seconds to minutes; interleaved, the profile and the shapes see the same spells, and each
    # side's median over the rounds is compared.
    for r in range(args.repeats):
        if reprofile:
            say(f"round {r + 1}/{args.repeats}: profile pass")
            passes.append(run_profile(model_dir, "float32", batches=(1, 2, 4, 8, 16, 32, 64), contexts=(16, 128), steps=6,
                                      progress=say, quantile=args.quantile))
        for shape in shapes:
            say(f"round {r + 1}/{args.repeats}")
            runs[shape].append(measure_decode(model_dir, *shape, args.ctx, steps=args.steps, progress=say, q=args.quantile,
                                              probe=speed_probe))
            say(f"  speed probe {runs[shape][-1].speed_s * 1e3:.2f} ms")
    if reprofile:
        profile = Profile.merge(passes).fit().calibrate()
        profile.save(args.profile)
    profile = Profile.load(args.profile)
    say(f"{args.repeats} rounds in {time.time() - t0:.0f}s")
    print("\n".join(profile.report()), file=sys.stderr)
    rows, drawn = [], False
    for (a, e, m, b) in shapes:
        rounds = runs[(a, e, m, b)]
        meas = sorted(rounds, key=lambda x: x.step_s)[len(rounds) // 2]             # the median round, as measured
        pred = profile.predict(a, e, m, b, meas.ctx)        # at the mean context of the timed steps
        rows.append({"A": a, "E": e, "M": m, "B": b, "threads": profile.rank_threads(a, e, m),
                     "predicted_ms": pred.iteration_s * 1e3, "measured_ms": meas.step_s * 1e3,
                     "rounds_ms": [x.step_s * 1e3 for x in rounds],
                     "speed_probe_ms": [x.speed_s * 1e3 for x in rounds],
                     "predicted_tok_s": pred.tokens_per_s, "measured_tok_s": meas.tokens_per_s,
                     "throughput_error": meas.step_s / pred.iteration_s - 1,
                     "step_ms_all": [t * 1e3 for t in meas.step_times]})
        rows[-1]["stages_predicted_ms"] = stage_medians(pred.spans, 0.5)
        rows[-1]["stages_measured_ms"] = stage_medians(meas.spans, 0.5)
        say("  stage medians, predicted | measured (ms): " + ", ".join(
            f"{k} {rows[-1]['stages_predicted_ms'].get(k, 0):.2f} | {v:.2f}" for k, v in rows[-1]["stages_measured_ms"].items()))
        say(f"A={a} E={e} m={m} B={b}: predicted {pred.iteration_s * 1e3:.1f} ms, measured {meas.step_s * 1e3:.1f} ms "
            f"({100 * rows[-1]['throughput_error']:+.1f}% throughput)")
        if m >= 2 and not drawn and args.timeline:
            draw_timeline([(f"predicted (A={a}, E={e}, m={m}, B={b})", pred.spans, pred.iteration_s),
                           (f"measured (A={a}, E={e}, m={m}, B={b})", meas.spans, meas.step_s)], args.timeline,
                          title=f"{profile.model.name}, {profile.machine}: one decode step")
            drawn = True
            say(f"wrote {args.timeline}")
    print(f"\nTimes: the {args.quantile:g}-quantile of span and step times on both sides. Machine: {profile.machine}. Model: {profile.model.name} (Mixtral-format h256, 6 layers, 8 experts top-2, fp32); "
          f"prompt {args.ctx}, {args.steps} timed decode steps per shape, {args.repeats} rounds (median round; all rounds in brackets); "
          f"speed probe of each round in ms (tuner/speed.py; lower = faster machine)")
    print("| A | E | m | B | threads/rank | predicted ms/step | measured ms/step (rounds) | predicted tokens/s | measured tokens/s "
          "| error | speed probe ms (rounds) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rounds = "/".join(f"{x:.0f}" for x in r["rounds_ms"])
        speeds = "/".join(f"{x:.1f}" for x in r["speed_probe_ms"])
        print(f"| {r['A']} | {r['E']} | {r['M']} | {r['B']} | {r['threads']} | {r['predicted_ms']:.1f} | {r['measured_ms']:.1f} ({rounds}) | "
              f"{r['predicted_tok_s']:.0f} | {r['measured_tok_s']:.0f} | {100 * r['throughput_error']:+.1f}% | {speeds} |")
    ok = ["{A},{E},{M},{B}".format(**r) for r in rows if abs(r["throughput_error"]) <= 0.10]
    print(f"\nwithin 10%: {len(ok)}/{len(rows)} shapes ({' '.join(ok)})")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": profile.machine, "model": profile.model.to_dict(), "ctx": args.ctx, "speed": profile.speed,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
