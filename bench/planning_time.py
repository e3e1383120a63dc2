"""Planning time: the 9 LLM-Blender models × 10,000 requests each on 8 A100s NVLinked in pairs.

    python bench/planning_time.py [--data ../shared/data] [--requests 10000] [--explore 1 3]

Prints one row per configuration: wall time of planning (this machine), simulator calls, predicted
makespan. "samullm (all)" is what `plan(problem, "samullm")` costs: the search plus the four
baselines it is compared with. The paper's code needs 14-191 s for its (smaller) problems.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paper_workloads import LengthSource, ensembling, gpu_pool, problem  # noqa: E402

from scheduler.planner import BASELINES, Planner  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data", help="reference traces ('' = shipped prior)")
    ap.add_argument("--requests", type=int, default=10_000, help="requests per model")
    ap.add_argument("--explore", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--gpus", type=int, default=8)
    args = ap.parse_args()
    data = Path(args.data) if args.data and Path(args.data, "traces").is_dir() else None
    specs, work = ensembling(args.requests, LengthSource(data))
    pool = gpu_pool("a100", args.gpus)
    n = sum(len(w) for w in work.values())
    print(f"{len(specs)} models x {args.requests:,} requests ({n:,} total), {args.gpus} A100 "
          f"(NVLink pairs), lengths from {'traces in ' + str(data) if data else 'shipped prior'}")
    head = f"{'configuration':<28}{'planning s':>12}{'simulations':>13}{'makespan s':>13}{'origin':>26}"
    print(head + "\n" + "-" * len(head))
    for explore in args.explore:
        for label, compare in ((f"samullm search, explore={explore}", False),
                               (f"samullm (all), explore={explore}", True)):
            planner = Planner(problem(specs, work, pool, explore=explore, compare_baselines=compare))
            t0 = time.perf_counter()
            s = planner.plan("samullm")
            dt = time.perf_counter() - t0
            print(f"{label:<28}{dt:>12.2f}{planner.est.simulations:>13}{s.makespan_s:>13.1f}"
                  f"{s.origin:>26}")
    for name in BASELINES:
        planner = Planner(problem(specs, work, pool))
        t0 = time.perf_counter()
        s = planner.plan(name)
        dt = time.perf_counter() - t0
        print(f"{name:<28}{dt:>12.2f}{planner.est.simulations:>13}{s.makespan_s:>13.1f}{'':>26}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
