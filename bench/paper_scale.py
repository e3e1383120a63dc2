"""Paper-scale comparison in simulation: predicted makespan per strategy on 8 and 4 A100s.

    python bench/paper_scale.py [--data ../shared/data] [--gpus 8 4] [--explore 3]

Workloads (see `paper_workloads.py`): ensembling with 1,000 and 5,000 prompts (9 models, every
prompt to every model, max_tokens 512), routing with 10,000 requests over 5 models (max_tokens
4096), and mixed (ensembling 1,000 + routing 10,000 at once). Same cost model for every strategy
(A100 latency from `scheduler.gpu_profiles`, simulator, load times). `samullm` returns the cheapest
of its search and the baselines; the `origin` column says which, and `search` gives the search's
own makespan, so the speed-ups are not a relabelled baseline.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paper_workloads import LengthSource, ensembling, gpu_pool, problem, routing  # noqa: E402

from scheduler.planner import BASELINES, STRATEGIES, Planner  # noqa: E402


def workloads(lengths: LengthSource):
    yield "ensembling 1k", ensembling(1000, lengths)
    yield "ensembling 5k", ensembling(5000, lengths)
    yield "routing 10k", routing(10_000, lengths)
    e_specs, e_work = ensembling(1000, lengths)
    r_specs, r_work = routing(10_000, lengths)
    yield "mixed", ({**e_specs, **r_specs}, {**e_work, **r_work})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data", help="reference traces ('' = shipped prior)")
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--explore", type=int, default=3)
    args = ap.parse_args()
    data = Path(args.data) if args.data and Path(args.data, "traces").is_dir() else None
    lengths = LengthSource(data)
    print(f"lengths from {'traces in ' + str(data) if data else 'the shipped prior'}; "
          f"makespans in seconds (predicted); speed-up = baseline / samullm")
    cols = "".join(f"{s:>17}" for s in STRATEGIES)
    head = f"{'workload':<15}{'GPUs':>5}{cols}{'search':>10}{'origin':>26}{'plan s':>8}"
    print(head + "\n" + "-" * len(head))
    for name, (specs, work) in workloads(lengths):
        for gpus in args.gpus:
            planner = Planner(problem(specs, work, gpu_pool("a100", gpus), explore=args.explore))
            t0 = time.perf_counter()
            scheds = {s: planner.plan(s) for s in STRATEGIES}
            dt = time.perf_counter() - t0
            ref = scheds["samullm"].makespan_s
            search = planner.search_schedule.makespan_s
            cells = f"{ref:>17.0f}" + "".join(
                f"{scheds[b].makespan_s:>9.0f} {scheds[b].makespan_s / ref:>5.2f}x" for b in BASELINES)
            print(f"{name:<15}{gpus:>5}{cells}{search:>10.0f}{scheds['samullm'].origin:>26}{dt:>8.1f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
