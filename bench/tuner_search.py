"""How fast `shuttle tune plan` searches: candidates a second on the DBRX preset's big search space.

    .venv/bin/python bench/tuner_search.py [--runs 5]

Prints the candidates examined, each run's time and the best and median rate. docs/tuning.md quotes
it; the target is 10^5 candidates a second (a whole search well under a second on a laptop core).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tuner.costs import RooflineCosts  # noqa: E402
from tuner.hardware import BUILTIN  # noqa: E402
from tuner.model_shape import PRESETS  # noqa: E402
from tuner.search import Requirements, SearchSpace, search  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="timed searches (default 5)")
    args = ap.parse_args(argv)
    shape = PRESETS["dbrx-132b"]
    space = SearchSpace(("H20", "H100"), ("L40S", "H100"), tp=(1, 2, 4, 8), attention_ranks=tuple(range(1, 9)))
    req = Requirements(tpot_slo_s=0.15)
    times, result = [], None
    for i in range(args.runs):
        t0 = time.perf_counter()
        result = search(shape, BUILTIN, space, req, lambda g, tp: RooflineCosts(shape, g, tp))
        times.append(time.perf_counter() - t0)
        print(f"run {i + 1}/{args.runs}: {result.candidates} candidates in {times[-1]:.3f} s", flush=True)
    n = result.candidates
    print(f"{n} candidates: best {n / min(times):,.0f}/s ({min(times) / n * 1e6:.2f} µs each), "
          f"median {n / statistics.median(times):,.0f}/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
