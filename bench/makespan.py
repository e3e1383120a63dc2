"""Measured makespans per strategy through the real gateway, against `vllm run_batch` per model.

For each workload (requests for 3-4 random-weight models of different sizes, prompt and output lengths
drawn from the real conversation trace and scaled to the models' 1k context): start `samullm serve`
(subprocess, generated config, state dir under `--root`), upload the input with the official `openai`
SDK and create ONE pooled batch per strategy (`metadata={"strategy": ...}`); the makespan is the wall
time from `batches.create` to the poll that sees `completed`. Output lengths are forced
(`ignore_eos: true`, `max_tokens` = the drawn length), so every run does the same work. The anchor
runs `python -m vllm.entrypoints.openai.run_batch` once per model, one after another, on the same
requests split per model (same engine args, both cores: `VLLM_CPU_OMP_THREADS_BIND=0-1`).

Predicted makespan: the executor's first `plan` event (read from the gateway's JSON log), which the
planner made with the profiles stored under `<root>/state/profiles/` (`samullm profile` is run for each
(model, TP) missing there). `samullm plan --json` on the same input shows every strategy's stages and
predictions, to explain what the planner chose. The same plan event's `lower_bound_s` (no schedule
can be predicted shorter, `scheduler.bounds`) gives each row's bound and measured / bound.

    .venv/bin/python -m bench.makespan [--data ../shared/data] [--workloads single,mixed,big-vs-tiny,overhead]
        [--strategies samullm,sequential,even-split] [--no-anchor] [--scale-requests 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.demo_setup import (ENGINE_ARGS, KV_GIB, MAX_BATCHED, MAX_MODEL_LEN, MAX_SEQS, MODELS,
                              REPO, ensure_profiles, make_requests, prepare,
                              refresh_start_times, word_tokens, write_config, write_jsonl)
from bench.gateway_run import (GatewayRun, add_wait_args, check_output, free_port, run_gateway,
                               wait_quiet)

# workload -> {model: requests}; "big-vs-tiny" is the non-obvious one (TP=2 helps medium, hurts tiny)
WORKLOADS = {
    "mixed": {"tiny-a": 64, "small": 64, "medium": 32},
    "big-vs-tiny": {"medium": 96, "tiny-a": 48, "tiny-b": 48},
    "single": {"small": 96},
    "smoke": {"tiny-a": 8, "tiny-b": 8},
    # the gateway's own overhead: one model, the same single engine on core 0 on both sides
    "overhead": {"small": 96},
}
ONE_CORE = ("overhead",)
STRATEGIES = ("samullm", "sequential", "even-split")


# ---------------------------------------------------------------------------------------------
# the anchor: vllm run_batch per model, one after another

def run_batch_cmd(model: str, path: Path, inp: Path, out: Path, bind: str = "0-1"
                  ) -> tuple[list[str], dict]:
    """Same engine args as the gateway's engines (runtime.engines.engine.build_command), both cores."""
    from runtime.config import ModelConfig
    from runtime.engines.api_server import ENGINE_MAIN
    from runtime.engines.engine import EngineSpec, build_command

    spec = EngineSpec(model=ModelConfig(name=model, path=str(path), max_model_len=MAX_MODEL_LEN,
                                        max_num_seqs=MAX_SEQS, max_num_batched_tokens=MAX_BATCHED,
                                        engine_args=dict(ENGINE_ARGS)),
                      model_path=path, devices=(0, 1), tp=1, kv_cache_gib=KV_GIB)
    cmd, env = build_command(spec, port=0)
    args = cmd[cmd.index(ENGINE_MAIN) + 1:]  # after the wrappers
    drop = {"--host": 2, "--port": 2, "--disable-uvicorn-access-log": 1}
    kept, i = [], 0
    while i < len(args):
        n = drop.get(args[i])
        if n:
            i += n
            continue
        kept.append(args[i])
        i += 1
    env["VLLM_CPU_OMP_THREADS_BIND"] = bind
    return ([sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(inp), "-o", str(out),
             *kept], env)


def bind_cores(bind: str) -> set[int]:
    """"0-1" / "0" / "0,2-3" -> the set of cores."""
    out: set[int] = set()
    for part in bind.replace("|", ",").split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def run_anchor(root: Path, paths: dict[str, Path], reqs: list[dict], tag: str, bind: str = "0-1"
               ) -> tuple[float, dict[str, float]]:
    """Total and per-model wall time of run_batch, one model after another."""
    per = {}
    work = root / "anchor"
    work.mkdir(parents=True, exist_ok=True)
    for model in sorted({r["body"]["model"] for r in reqs}, key=lambda m: -MODELS[m]["hidden"]):
        mine = [r for r in reqs if r["body"]["model"] == model]
        inp = write_jsonl(work / f"{tag}-{model}.jsonl", mine)
        out = work / f"{tag}-{model}.out.jsonl"
        out.unlink(missing_ok=True)
        cmd, env = run_batch_cmd(model, paths[model], inp, out, bind)
        t0 = time.monotonic()
        with open(root / "logs" / f"run_batch-{tag}-{model}.log", "w") as log:
            # confined to its cores like the gateway's engines (EngineSpec.confined_cores)
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                preexec_fn=lambda: os.sched_setaffinity(0, bind_cores(bind))
                                ).returncode
        per[model] = time.monotonic() - t0
        if rc != 0:
            raise RuntimeError(f"run_batch {model} exited {rc}; see logs/run_batch-{tag}-{model}.log")
        check_output(out.read_text(), mine, f"run_batch {model}")
    return sum(per.values()), per


# ---------------------------------------------------------------------------------------------
# offline plan (why the planner chose what it chose)

def offline_plan(cfg_path: Path, inp: Path) -> dict:
    cmd = [sys.executable, "-m", "cli.main", "plan", str(inp), "--config", str(cfg_path), "--json"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": res.stderr[-500:]}
    return json.loads(res.stdout)


def _threads(p: dict) -> str:
    return f"x{p['threads']}threads" if p.get("threads", 1) > 1 else ""


def describe_plan(result: dict) -> list[str]:
    if "error" in result:
        return [f"  samullm plan failed: {result['error']}"]
    out = []
    for s, r in (result.get("strategies") or {}).items():
        stages = " | ".join(
            ", ".join(f"{p['model']} tp{p['tp']}xdp{p['dp']}{_threads(p)}@{p['devices']}"
                      for p in st["plans"])
            + f" ({st['start_s']:.0f}-{st['end_s']:.0f}s)" for st in r.get("stages", []))
        origin = f" [{r['origin']}]" if r.get("origin") else ""
        out.append(f"  plan {s:<16} {r['makespan_s']:7.1f} s{origin}: {stages}")
    return out


def describe_events(run: GatewayRun) -> list[str]:
    out = []
    t0 = run.events[0]["t"] if run.events else 0.0
    for e in run.events:
        if e["event"] in ("plan", "replan"):
            st = ", ".join(f"{p['model']} tp{p['tp']}xdp{p['dp']}{_threads(p)}@{p['devices']}"
                           for p in e["stage"])
            out.append(f"    +{e['t'] - t0:6.1f}s {e['event']:<7} predicted "
                       f"{e['predicted_makespan_s']:.1f}s, {e['stages']} stages; now: {st}")
        elif e["event"] == "engine_started":
            out.append(f"    +{e['t'] - t0:6.1f}s started {e.get('model')} tp{e.get('tp')} on "
                       f"{e.get('devices')} (start {e.get('start_s') or 0:.1f}s"
                       f"{', in a spare' if e.get('spare') else ''})")
        elif e["event"] == "model_finished":
            out.append(f"    +{e['t'] - t0:6.1f}s finished {e.get('model')}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None,
                    help="shared data dir (traces/splitwise_conv.csv); default: shipped prior tables")
    ap.add_argument("--root", type=Path, default=REPO / ".samullm" / "bench-makespan")
    ap.add_argument("--workloads", default="single,mixed,big-vs-tiny,overhead")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--scale", type=float, default=0.25, help="trace lengths x this (4k -> 1k ctx)")
    ap.add_argument("--scale-requests", type=float, default=1.0, help="requests per model x this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-anchor", action="store_true")
    ap.add_argument("--quick-profile", action="store_true")
    ap.add_argument("--refresh-start-times", action="store_true",
                    help="re-measure every stored profile's engine start time before the runs")
    add_wait_args(ap)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per strategy and of the anchor (alternating); the table shows medians")
    args = ap.parse_args(argv)
    root, paths = prepare(args.root)
    cfg_path = write_config(root, paths, free_port())
    workloads = {w: {m: max(1, round(n * args.scale_requests)) for m, n in WORKLOADS[w].items()}
                 for w in args.workloads.split(",")}
    ensure_profiles(cfg_path, root, sorted({m for w in workloads.values() for m in w}),
                    args.quick_profile)
    if args.refresh_start_times:
        wait_quiet(args.max_load, args.max_wait)
        refresh_start_times(cfg_path, root, sorted({m for w in workloads.values() for m in w}))
    words = word_tokens(paths["tiny-a"])
    strategies = args.strategies.split(",")
    results = []
    for wi, (wname, wl) in enumerate(workloads.items()):
        reqs = make_requests(wl, args.data, args.scale, args.seed + wi, words)
        inp = write_jsonl(root / f"{wname}.jsonl", reqs)
        toks = sum(r["body"]["max_tokens"] for r in reqs)
        print(f"\n== {wname}: {dict(wl)}, {len(reqs)} requests, {toks} output tokens", flush=True)
        one_core = wname in ONE_CORE
        wcfg = write_config(root, paths, free_port(), (0,), "one-core.toml") if one_core else cfg_path
        offline = offline_plan(wcfg, inp)
        for line in describe_plan(offline):
            print(line)
        row = {"workload": wname, "models": wl, "requests": len(reqs), "output_tokens": toks,
               "offline_plan": offline, "runs": {}}
        strats = ["samullm"] if len(wl) == 1 else strategies
        # repeats alternate the sides (gateway strategies, then the anchor, again), so that a slow
        # spell of the machine does not fall on one side only; the table shows the median
        for rep in range(args.repeats):
            for s in strats:
                load = wait_quiet(args.max_load, args.max_wait)
                run = run_gateway(wcfg, root, inp, s, reqs, args.timeout, f"{wname}-r{rep}")
                print(f"  {s:<12} measured {run.makespan_s:7.1f} s   predicted "
                      f"{run.predicted_s or float('nan'):7.1f} s   (load avg {load:.2f} at start)",
                      flush=True)
                for line in describe_events(run):
                    print(line)
                add_run(row["runs"], s, {"measured_s": run.makespan_s,
                                         "predicted_s": run.predicted_s,
                                         "lower_bound_s": run.lower_bound_s, "load": load,
                                         "events": run.events})
            if not args.no_anchor:
                load = wait_quiet(args.max_load, args.max_wait)
                total, per = run_anchor(root, paths, reqs, wname, "0" if one_core else "0-1")
                print(f"  run_batch    measured {total:7.1f} s   per model "
                      + ", ".join(f"{m} {t:.1f}s" for m, t in per.items()), flush=True)
                add_run(row["runs"], "run_batch", {"measured_s": total, "per_model_s": per,
                                                   "load": load})
        results.append(row)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
    print()
    for line in table(results):
        print(line)
    return 0



def add_run(runs: dict, name: str, rec: dict) -> None:
    """Keep every repeat under "repeats"; the row's own fields are the median repeat's."""
    reps = runs.setdefault(name, {"repeats": []})["repeats"]
    reps.append(rec)
    by_time = sorted(reps, key=lambda r: r["measured_s"])
    median = by_time[(len(by_time) - 1) // 2]
    runs[name].update({k: v for k, v in median.items() if k != "events"})
    runs[name]["events"] = median.get("events", [])


def table(results: list[dict]) -> list[str]:
    """The README's Markdown table (rows of `--json` output)."""
    out = ["| workload | strategy | measured s | predicted s | error | bound s | measured / bound "
           "| load | samullm speed-up over it |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results:
        runs = row["runs"]
        ours = runs.get("samullm", {}).get("measured_s")
        models = ", ".join(f"{m} {n}" for m, n in row["models"].items())
        for s, r in runs.items():
            pred = r.get("predicted_s")
            err = f"{(pred - r['measured_s']) / r['measured_s']:+.0%}" if pred else "–"
            speed = f"{r['measured_s'] / ours:.2f}×" if ours and s != "samullm" else "–"
            reps = [x["measured_s"] for x in r.get("repeats", [])]
            measured = f"{r['measured_s']:.1f}" + (
                f" ({', '.join(f'{x:.1f}' for x in reps)})" if len(reps) > 1 else "")
            out.append(f"| {row['workload']} ({models}) | {s} | {measured} | "
                       f"{f'{pred:.1f}' if pred else '–'} | {err} | "
                       f"{bound_cells(r['measured_s'], r.get('lower_bound_s'))} | "
                       f"{r.get('load', 0):.1f} | {speed} |")
    return out


def bound_cells(measured: float | None, bound: float | None) -> str:
    """A makespan table's "bound s | measured / bound" cells: the lower bound of the run's first
    plan event (`lower_bound_s`, `scheduler.bounds`) and how far above it the run ended."""
    if not bound or not measured:
        return "– | –"
    return f"{bound:.1f} | {measured / bound:.2f}×"


def print_table(path: Path) -> int:
    for line in table(json.loads(path.read_text())):
        print(line)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:  # re-print the table of an earlier --json file
        raise SystemExit(print_table(Path(sys.argv[2])))
    raise SystemExit(main())
