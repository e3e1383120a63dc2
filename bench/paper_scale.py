"""Paper-scale comparison in simulation: predicted makespan per strategy on 8 and 4 A100s.

    python bench/paper_scale.py [--data ../shared/data] [--gpus 8 4] [--explore 3] [--apps]

Workloads (see `paper_workloads.py`): ensembling with 1,000 and 5,000 prompts (9 models, every
prompt to every model, max_tokens 512), routing with 10,000 requests over 5 models (max_tokens
4096), and mixed (ensembling 1,000 + routing 10,000 at once). Same cost model for every strategy
(A100 latency from `scheduler.gpu_profiles`, simulator, load times). `samullm` returns the cheapest
of its search and the baselines; the `origin` column says which, and `search` gives the search's
own makespan, so the speed-ups are not a relabelled baseline.

`--apps`: the multi-LLM applications with dependent requests instead (`paper_workloads`: LLM-Blender
ensemble + a Llama-2-70b fuser over 1,000 prompts, chain summarisation of 100 and 300 documents by
vicuna-13b with a Llama-2-70b grader, and the mixed application: both of those and routing 10k at
once), `samullm` against `level-by-level` (each topological level a pooled job of its own, as users
run dependent calls on batch APIs without dependencies) and `sequential`, as a Markdown table
beside the paper's reported 1.0-2.4x.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paper_workloads import (LengthSource, chain_summary, ensemble_fuser, ensembling,  # noqa: E402
                             gpu_pool, problem, routing, union)

from scheduler.planner import BASELINES, STRATEGIES, Planner  # noqa: E402


def workloads(lengths: LengthSource):
    yield "ensembling 1k", ensembling(1000, lengths)
    yield "ensembling 5k", ensembling(5000, lengths)
    yield "routing 10k", routing(10_000, lengths)
    e_specs, e_work = ensembling(1000, lengths)
    r_specs, r_work = routing(10_000, lengths)
    yield "mixed", ({**e_specs, **r_specs}, {**e_work, **r_work})


APP_STRATEGIES = ("samullm", "level-by-level", "sequential")
PAPER_SPEEDUP = "1.0-2.4x"  # PAPER.md §5: SamuLLM's end-to-end speed-up over its competitors


def app_workloads(lengths: LengthSource):
    yield "ensemble + fuser 1k", ensemble_fuser(1000, lengths)
    yield "chain 100 docs", chain_summary(100, lengths)
    yield "chain 300 docs", chain_summary(300, lengths)
    yield "mixed", union(ensemble_fuser(1000, lengths), chain_summary(100, lengths),
                         routing(10_000, lengths))


def apps_table(lengths: LengthSource, gpus: list[int], explore: int) -> None:
    missing = [s for s in APP_STRATEGIES if s not in STRATEGIES]
    if missing:
        print(f"the planner has no strategy {', '.join(missing)} yet (scheduler.planner.STRATEGIES): "
              "no application figures")
        return
    base = APP_STRATEGIES[1:]
    print("| application | requests | A100s | samullm s | " + " | ".join(f"{b} s" for b in base)
          + " | search s | samullm origin | plan s | paper |\n|---|---:|---:|---:|"
          + "---:|" * len(base) + "---:|---|---:|---|", flush=True)
    for name, (specs, work) in app_workloads(lengths):
        n = sum(len(w) for w in work.values())
        for g in gpus:
            planner = Planner(problem(specs, work, gpu_pool("a100", g), explore=explore))
            t0 = time.perf_counter()
            scheds = {s: planner.plan(s) for s in APP_STRATEGIES}
            dt = time.perf_counter() - t0
            ref = scheds["samullm"].makespan_s
            cells = " | ".join(f"{scheds[b].makespan_s:,.0f} ({scheds[b].makespan_s / ref:.2f}x)"
                               for b in base)
            search = planner.search_schedule.makespan_s
            print(f"| {name} | {n:,} | {g} | {ref:,.0f} | {cells} | {search:,.0f} | "
                  f"{scheds['samullm'].origin} | "
                  f"{dt:.1f} | {PAPER_SPEEDUP} |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data", help="reference traces ('' = shipped prior)")
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--explore", type=int, default=3)
    ap.add_argument("--apps", action="store_true",
                    help="the applications with dependent requests (see the module docstring)")
    args = ap.parse_args()
    data = Path(args.data) if args.data and Path(args.data, "traces").is_dir() else None
    lengths = LengthSource(data)
    if args.apps:
        print(f"lengths from {'traces in ' + str(data) if data else 'the shipped prior'}; "
              "predicted makespans in seconds; (x) = that strategy / samullm\n")
        apps_table(lengths, args.gpus, args.explore)
        return 0
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
