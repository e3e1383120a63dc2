"""`samullm plan`: predict the stages and makespan of a batch input under every strategy, offline.

    samullm plan INPUT.jsonl [...] --config C [--devices auto|cpu:N|a100x8-nvlink-pairs|h100x8|4xa100x8]
        [--strategy samullm|sequential|even-split|per-model-best|muxserve-greedy|all]
        [--json] [--gantt OUT.png|OUT.svg] [--seed N] [--samples N]

No engine is started. The inputs are validated as the gateway validates a batch, and the problem
is built by the executor's own adapter (`runtime.executor.planning.plan_problem`: the same token estimates, the
same length draw and seed, the same latency source with measured start times and profiles under the
state dir, the same devices and idle spare engine processes), so for the same input, config and
state dir the predicted makespan of a strategy is the one the `plan` event of a batch submitted to
an idle gateway reports; that includes the online calibration `serve` keeps in the state dir
(refitted as `serve` refits it before a plan). Every strategy's schedule is then replayed on
`--samples` draws for the makespan's mean and spread. `latency_sources` says, per model and
shape, where its latency comes from: a profile, the roofline (or GPU model), corrected by the
online calibration of that shape or by one derived from other shapes or models.
`lower_bound_s` ("lower bound N s"): the least makespan any schedule of the input could have under
the same cost model (`scheduler.bounds`), as the `plan` event reports it.

Each input file is a batch of the pool (`input-<i>`, as batches submitted in turn): per strategy,
`inputs` gives each file's requests and its predicted completion (when its last request is
predicted to finish, `Planner.group_finish`); the text output shows them for the strategy chosen
(`--strategy`, or the config's strategy with `all`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from gateway.tokens import TokenCounter
from gateway.lines import iter_lines
from gateway.validation import CHAT, validate_file
from runtime.config import Config, ConfigError, load_config
from runtime.engines.devices import planning_pool
from runtime.persist import (load_calibration, load_length_model, load_start_times,
                             start_times_file)
from runtime.executor.deps import BatchGraph
from runtime.executor.pool_state import batch_reqs
from runtime.executor.queues import idle_gateway_order
from runtime.executor.planning import (model_specs, plan_problem, refit_calibration, sample_work,
                                       sleep_budget)
from runtime.executor.latency_source import LatencySource, latency_sources
from scheduler.planner import STRATEGIES, Planner
from scheduler.types import DevicePool, Schedule
from scheduler.workloads import makespan_stats
from tools.gantt import write_gantt


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT.jsonl", help="OpenAI batch input file(s)")
    p.add_argument("--config", default="conf/default.toml")
    p.add_argument("--devices", default="auto",
                   help="auto (from the config) | cpu:N | a100xN[-nvlink-pairs] | h100xN | "
                        "NxKINDxM: N cluster nodes of M devices (4xa100x8, 2xcpux16)")
    p.add_argument("--gpu", default="a100", choices=("a100", "h100"),
                   help="GPU profiles for --devices auto with a cuda config")
    p.add_argument("--strategy", default="all", choices=STRATEGIES + ("all",))
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--gantt", default=None, metavar="OUT", help="write a Gantt chart (.png or .svg)")
    p.add_argument("--seed", type=int, default=None, help="length-sampling seed (default: config)")
    p.add_argument("--samples", type=int, default=None,
                   help="output-length draws for the makespan estimate (default: config)")
    p.add_argument("--top-k", type=int, default=None, help="search width (default: config)")


# ---------------------------------------------------------------------------------------------
# inputs: validated as `serve` validates them, planned as `serve` plans them

def read_requests(paths: list[str], cfg: Config) -> list[Req]:
    """Each input file validated as the gateway validates a batch of it (same token estimates,
    caps and rules), as the requests of one pool (file order, like batches submitted in turn).
    A file `serve` would fail is a ConfigError naming its first errors."""
    tokens = TokenCounter(cfg)
    reqs: list[Req] = []
    for i, path in enumerate(paths):
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"cannot read input {path}: no such file")
        result = validate_file(p, _endpoint_of(p), cfg, tokens)
        if not result.ok:
            shown = "; ".join(f"line {e['line']}: {e['code']}: {e['message']}"
                              for e in result.errors[:5])
            raise ConfigError(f"{path}: {result.error_count} invalid line(s): {shown}")
        batch = batch_reqs(f"input-{i}", result.items)
        if any(it.depends_on for it in result.items):
            BatchGraph(batch)  # dependents wait for their upstream requests, as `serve` has them
        reqs.extend(batch)
    return reqs


def _endpoint_of(path: Path) -> str:
    """The batch endpoint a file's lines name (the first line's `url`; validation checks the rest)."""
    for _, _, raw in iter_lines(path):
        if bytes(raw).strip():
            try:
                url = orjson.loads(raw).get("url")
            except (orjson.JSONDecodeError, AttributeError):
                break
            return url if isinstance(url, str) else CHAT
    return CHAT



# ---------------------------------------------------------------------------------------------
# output

def stage_rows(s: Schedule) -> list[dict[str, Any]]:
    return [{"start_s": round(st.start_s, 3), "end_s": round(st.end_s, 3),
             "finished": st.finished, "restarts": st.restarts,
             **({"waits_on": st.waits_on} if st.waits_on else {}),
             "plans": [{"model": p.model, "tp": p.tp, "dp": p.dp, "devices": list(p.devices)}
                       | ({"threads": p.threads} if p.threads > 1 else {})
                       for p in st.plans]} for st in s.stages]


def input_rows(paths: list[str], reqs: list[Req], done: dict[Any, float],
               makespan_s: float) -> list[dict[str, Any]]:
    """Per input file (batch `input-<i>`): its requests and predicted completion (None: no
    requests)."""
    counts: dict[str, int] = {}
    for r in reqs:
        counts[r.batch_id] = counts.get(r.batch_id, 0) + 1
    rows = []
    for i, path in enumerate(paths):
        f = done.get(f"input-{i}")
        rows.append({"file": path, "requests": counts.get(f"input-{i}", 0),
                     "predicted_completion_s": None if f is None else
                     round(min(f, makespan_s), 3)})
    return rows


def render_inputs(name: str, rows: list[dict[str, Any]]) -> list[str]:
    """The table of each input file's predicted completion under strategy `name`."""
    width = max([len("file")] + [len(r["file"]) for r in rows])
    head = f"  {'file':<{width}}{'requests':>10}{'predicted completion':>22}"
    out = [f"predicted completion per input file ({name}):", head, "  " + "-" * (len(head) - 2)]
    for r in rows:
        f = r["predicted_completion_s"]
        out.append(f"  {r['file']:<{width}}{r['requests']:>10}{'-' if f is None else _fmt_s(f):>22}")
    return out


def render_sources(rows: list[dict[str, Any]]) -> list[str]:
    """One line per model and shape: where its latency figures come from."""
    out = ["latency sources (per model and shape):"]
    for r in rows:
        shape = f"TP{r['tp']}" + (f"x{r['threads']}threads" if r["threads"] > 1 else "")
        what = r["source"]
        if what == "online calibration":
            what += (f" of {r['served']} served requests (replay error "
                     f"{r['replay_err_before']:+.0%} -> {r['replay_err_after']:+.0%}"
                     + (f", fresh engine +{r['fresh_engine_s']:.1f}s" if r["fresh_engine_s"] else "")
                     + ")")
        elif what == "derived":
            what += f" ({r['detail']})"
        if "token_scale" in r:
            what += f", x{r['token_scale']:.2f} per token, x{r['step_scale']:.2f} per step"
            what += f", on the {r['base']}"
        lines = f"  {r['model']:<12} {shape:<14} {what}; start {r['start_s']:.1f}s ({r['start']})"
        out.append(lines)
    return out


def _fmt_s(x: float) -> str:
    return f"{x:,.1f}s" if x < 3600 else f"{x / 3600:,.2f}h"


def render_text(result: dict[str, Any], chosen: str | None = None) -> str:
    lines = [f"devices: {result['devices']}   requests: {result['requests']}   "
             f"samples: {result['samples']}   planning: {result['planning_time_s']:.2f}s"]
    strategies = result["strategies"]
    for name, s in strategies.items():
        origin = f" (stages of {s['origin'][9:]})" if s["origin"].startswith("baseline:") else ""
        lines.append(f"\n== {name}{origin}: predicted makespan {_fmt_s(s['makespan_s'])}")
        for i, st in enumerate(s["stages"], 1):
            plans = ", ".join(f"{p['model']} TP{p['tp']}xDP{p['dp']}"
                              + (f"x{p['threads']}threads" if p.get("threads", 1) > 1 else "")
                              + f" @{_ids(p['devices'])}"
                              for p in st["plans"])
            lines.append(f"  stage {i}: {_fmt_s(st['start_s'])} -> {_fmt_s(st['end_s'])}  {plans}"
                         f"  | done: {', '.join(st['finished'])}"
                         + (f"  | (re)start: {', '.join(st['restarts'])}" if st["restarts"] else "")
                         + "".join(f"  | {m} waits on {', '.join(ups)}"
                                   for m, ups in st.get("waits_on", {}).items()))
    lines.append("")
    ref = strategies.get("samullm")
    head = f"{'strategy':<17}{'makespan':>12}{'mean ± std over draws':>28}{'samullm speedup':>17}"
    lines += [head, "-" * len(head)]
    for name, s in strategies.items():
        st = s["samples"]
        spread = f"{_fmt_s(st['mean_s'])} ± {_fmt_s(st['std_s'])}"
        speed = f"{s['makespan_s'] / ref['makespan_s']:.2f}x" if ref and ref["makespan_s"] > 0 else "-"
        lines.append(f"{name:<17}{_fmt_s(s['makespan_s']):>12}{spread:>28}{speed:>17}")
    if result.get("lower_bound_s") is not None:
        lines.append(f"lower bound {result['lower_bound_s']:,.1f} s")
    if chosen in strategies and strategies[chosen].get("inputs"):
        lines += [""] + render_inputs(chosen, strategies[chosen]["inputs"])
    if result.get("latency_sources"):
        lines += [""] + render_sources(result["latency_sources"])
    return "\n".join(lines)


def _ids(ids: list[int]) -> str:
    return ",".join(map(str, ids))


def plan_main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    sched = cfg.scheduler
    cfg = dataclasses.replace(cfg, scheduler=dataclasses.replace(
        sched, seed=sched.seed if args.seed is None else args.seed,
        top_k=sched.top_k if args.top_k is None else args.top_k))
    seed = cfg.scheduler.seed
    samples = max(1, cfg.scheduler.samples if args.samples is None else args.samples)
    # in the order the engines would serve them (fair queues: the smallest batch first)
    reqs = idle_gateway_order(read_requests(args.inputs, cfg), cfg.scheduler.fairness)
    if not reqs:
        print("samullm plan: no requests in the input", file=sys.stderr)
        return 1
    pool = planning_pool(args.devices, cfg, args.gpu)
    lengths = load_length_model(cfg.state_dir)
    # an idle gateway's spares: none, or a ready zygote that forks one for every start; the
    # planner prices both alike (`PoolExecutor._spare_state`)
    spares, no_spare_s = None, 0.0
    specs = model_specs(cfg, pool.kind)
    fits = {}
    if cfg.scheduler.online_calibration:  # what `serve` fits before its next plan
        served, stored = load_calibration(cfg.state_dir, cfg.scheduler.calibration_window)
        fits = refit_calibration(cfg, pool, specs, cfg.state_dir, served.snapshot(), stored)
    # the problem an idle gateway's first plan of these requests solves (same draw, same seed)
    starts = load_start_times(cfg.state_dir, start_times_file(cfg.cluster.backend))
    # an idle gateway's engines sleep when a stage replaces them (CPU, on this machine): its
    # whole sleep budget is free (`slots.EngineSlots.sleep_room`)
    budget = sleep_budget(cfg)
    room = budget if pool.kind == "cpu" and cfg.cluster.backend == "local" and budget > 0 else None
    problem = plan_problem(cfg, pool, specs, cfg.state_dir, reqs, lengths,
                           starts, 1, {}, spares, no_spare_s, fits, sleep_room=room)
    draws = [problem.work] + [sample_work(reqs, lengths, np.random.default_rng([seed, s]))
                              for s in range(2, samples + 1)]
    names = STRATEGIES if args.strategy == "all" else (args.strategy,)
    planner = Planner(problem)
    t0 = time.perf_counter()
    scheds = {n: planner.plan(n) for n in names}
    planning = time.perf_counter() - t0
    result = {
        "devices": f"{pool.count}x {pool.kind}"
                   + (f" groups {list(map(list, pool.groups))}" if pool.groups else ""),
        "start_contention": pool.start_contention,
        "requests": len(reqs),
        "samples": samples, "seed": seed, "planning_time_s": planning,
        # no schedule can be predicted shorter (`scheduler.bounds`; the plan event's lower_bound_s)
        "lower_bound_s": planner.lower_bound().value_s,
        "strategies": {n: {"makespan_s": s.makespan_s, "origin": s.origin,
                           "samples": makespan_stats(planner, s, draws).to_dict(),
                           "stages": stage_rows(s),
                           "inputs": input_rows(args.inputs, reqs,
                                                planner.group_finish(s, problem.groups or {}),
                                                s.makespan_s)}
                       for n, s in scheds.items()},
    }
    if isinstance(problem.latency, LatencySource):
        result["latency_sources"] = latency_sources(problem.latency, problem.models, pool)
    if "samullm" in scheds:
        ref = scheds["samullm"].makespan_s
        result["speedup_of_samullm"] = {n: (s.makespan_s / ref if ref > 0 else None)
                                        for n, s in scheds.items() if n != "samullm"}
    if args.gantt:
        write_gantt(scheds, pool, args.gantt)
    chosen = names[0] if len(names) == 1 else (
        cfg.scheduler.strategy if cfg.scheduler.strategy in scheds else "samullm")
    print(json.dumps(result, indent=2) if args.json else render_text(result, chosen))
    return 0
