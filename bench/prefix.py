"""Shared prompt prefixes and warm engines, through the real gateway, against vLLM's `run_batch`.

Workloads on `bench.makespan`'s demo models (one-token words, so a prompt of k words is k tokens;
outputs forced with `ignore_eos`, every output checked):
- `system`: `small`, 160 chat requests sharing a 900-token system prompt, 20-token questions,
  16 output tokens each (the scene of the issue: run_batch with its prefix cache was faster);
- `few-shot`: tiny-a, tiny-b and small, 96 requests each, each model with its own 600-token
  few-shot block before a 30-token question, 32 output tokens: pooled in one batch;
- `unshared`: tiny-a and small, 64 requests each of random words and trace lengths (nothing to
  share: no regression);
- `repeat`: the same 64-request `small` batch submitted three times to one gateway, each after
  the previous completed: the second and third find the engine warm (`engine_linger_s`).

For each: samullm measured (a fresh `samullm serve`, its spare engine processes ready, from
`batches.create` to `completed`) and predicted (the executor's first plan), `run_batch` at its
defaults (prefix caching on) per model one after another, and the prefix-cache hit rate: measured
from the responses' `usage.prompt_tokens_details.cached_tokens` (the engine's own count), simulated
by replaying each model's requests, in the order its queue takes them, through the planner's
engine simulator with the gateway's prefix chains (`gateway.prefixes`).

    .venv/bin/python -m bench.prefix --data ../shared/data --quick-profile [--workloads system,...]
    .venv/bin/python -m bench.prefix --table .samullm/bench-makespan/prefix.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import demo_setup as setup  # noqa: E402
from bench import gateway_run as gw  # noqa: E402
from bench import makespan as mk  # noqa: E402

WORKLOADS = ("system", "few-shot", "unshared", "repeat")
REPEATS = 3  # batches of the `repeat` workload


def _words(words: list[str], rng: np.random.Generator, n: int) -> str:
    return " ".join(words[j] for j in rng.integers(0, len(words), n))


def _line(cid: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    return {"custom_id": cid, "method": "POST", "url": setup.CHAT,
            "body": {"model": model, "messages": messages, "max_tokens": max_tokens,
                     "ignore_eos": True, "temperature": 1.0}}


def make_workload(name: str, words: list[str], data: Path | None, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    if name == "system":
        system = _words(words, rng, 900)
        return [_line(f"q-{i}", "small", [{"role": "system", "content": system},
                                           {"role": "user", "content": _words(words, rng, 20)}],
                      16) for i in range(160)]
    if name == "few-shot":
        out = []
        for model in ("tiny-a", "tiny-b", "small"):
            shots = _words(words, rng, 600)
            out += [_line(f"{model}-{i}", model,
                          [{"role": "user", "content": shots + "\nQuestion: "
                            + _words(words, rng, 30)}], 32) for i in range(96)]
        return [out[i] for i in rng.permutation(len(out))]
    if name == "unshared":
        return setup.make_requests({"tiny-a": 64, "small": 64}, data, 0.25, seed, words)
    if name == "repeat":
        return [_line(f"r-{i}", "small", [{"role": "user", "content": _words(words, rng, 120)}],
                      32) for i in range(64)]
    raise ValueError(name)


def measured_hits(text: str) -> tuple[int, int]:
    """(cached prompt tokens, prompt tokens) over the output file's responses."""
    hits = total = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        usage = json.loads(line)["response"]["body"]["usage"]
        total += int(usage.get("prompt_tokens") or 0)
        hits += int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return hits, total


def run_batch_hits(root: Path, tag: str, models: list[str]) -> tuple[int, int]:
    hits = total = 0
    for m in models:
        out = root / "anchor" / f"{tag}-{m}.out.jsonl"
        if out.exists():
            h, t = measured_hits(out.read_text())
            hits, total = hits + h, total + t
    return hits, total


def simulated_hits(cfg_path: Path, inp: Path) -> tuple[int, int]:
    """The planner's engine simulator on each model's requests (one engine, queue order)."""
    from gateway.tokens import TokenCounter
    from gateway.validation import validate_file
    from runtime.config import load_config
    from runtime.executor.planning import model_specs
    from runtime.executor.pool_state import prefix_order
    from scheduler.latency import LatencyModel
    from scheduler.simulator import EngineLimits, kv_blocks, simulate
    from scheduler.types import SimRequest

    cfg = load_config(cfg_path)
    res = validate_file(inp, setup.CHAT, cfg, TokenCounter(cfg))
    if not res.ok:
        raise RuntimeError(f"{inp}: {res.errors[:3]}")
    specs = model_specs(cfg, "cpu")
    lat = LatencyModel(1e-3, 1e-6, 0.0, 0.0, 0.0)  # hits do not depend on the speed
    hits = total = 0
    items = prefix_order(res.items)
    for model in sorted({it.model for it in items}):
        spec = specs[model]
        reqs = [SimRequest(rid=i, prompt_len=it.prompt_tokens, output_len=max(1, it.max_tokens),
                           prefix=it.prefix) for i, it in enumerate(items) if it.model == model]
        lim = EngineLimits.for_spec(spec, kv_blocks(spec, 1, int(setup.KV_GIB * (1 << 30))))
        r = simulate(reqs, lim, lat)
        hits, total = hits + r.prefix_hit_tokens, total + r.prefix_queries_tokens
    return hits, total


def rate(h: int, t: int) -> float | None:
    return round(h / t, 3) if t else None


def run_repeat(cfg_path: Path, root: Path, inp: Path, reqs: list[dict], timeout_s: float) -> dict:
    """The same batch REPEATS times on one gateway: wall time and engines started, each."""
    out = []
    with gw.serving(cfg_path, root, "repeat", "samullm") as (client, log_path):
        with open(inp, "rb") as f:
            fobj = client.files.create(file=f, purpose="batch")
        for k in range(REPEATS):
            before = len([e for e in gw.executor_events(log_path) if e["event"] == "engine_start"])
            t0 = time.monotonic()
            batch = gw.run_to_end(client, fobj.id, None, timeout_s, f"repeat {k + 1}")
            wall = time.monotonic() - t0
            text = client.files.content(batch.output_file_id).text
            gw.check_output(text, reqs, f"repeat {k + 1}")
            events = gw.executor_events(log_path)
            starts = len([e for e in events if e["event"] == "engine_start"]) - before
            plans = [e for e in events if e["event"] in ("plan", "replan")]
            out.append({"measured_s": wall, "engine_starts": starts,
                        "predicted_s": plans[-1].get("predicted_makespan_s") if plans else None,
                        "hit_rate": rate(*measured_hits(text))})
            print(f"  batch {k + 1}: {wall:6.1f} s, {starts} engine start(s), hit rate "
                  f"{out[-1]['hit_rate']}", flush=True)
    return {"batches": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--root", type=Path, default=REPO / ".samullm" / "bench-makespan")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick-profile", action="store_true")
    ap.add_argument("--skip-profiles", action="store_true")
    ap.add_argument("--no-anchor", action="store_true")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--max-load", type=float, default=1.5)
    ap.add_argument("--max-wait", type=float, default=900)
    ap.add_argument("--table", type=Path, default=None, help="print the table of a results file")
    args = ap.parse_args(argv)
    if args.table:
        for line in table(json.loads(args.table.read_text())):
            print(line)
        return 0
    root, paths = setup.prepare(args.root)
    cfg_path = setup.write_config(root, paths, gw.free_port())
    names = args.workloads.split(",")
    words = setup.word_tokens(paths["tiny-a"])
    built = {n: make_workload(n, words, args.data, args.seed + i) for i, n in enumerate(names)}
    if not args.skip_profiles:
        setup.ensure_profiles(cfg_path, root, sorted({r["body"]["model"] for w in built.values()
                                                   for r in w}), args.quick_profile)
    results: list[dict[str, Any]] = []
    out_path = root / "prefix.json"
    for name, reqs in built.items():
        inp = setup.write_jsonl(root / f"prefix-{name}.jsonl", reqs)
        models = sorted({r["body"]["model"] for r in reqs})
        print(f"\n== {name}: {len(reqs)} requests on {', '.join(models)}", flush=True)
        row: dict[str, Any] = {"workload": name, "requests": len(reqs), "models": models,
                               "simulated_hit_rate": rate(*simulated_hits(cfg_path, inp))}
        load = gw.wait_quiet(args.max_load, args.max_wait)
        if name == "repeat":
            row["samullm"] = run_repeat(cfg_path, root, inp, reqs, args.timeout)
        else:
            with gw.serving(cfg_path, root, f"prefix-{name}", "samullm") as (client, log_path):
                with open(inp, "rb") as f:
                    fobj = client.files.create(file=f, purpose="batch")
                t0 = time.monotonic()
                batch = gw.run_to_end(client, fobj.id, None, args.timeout, name)
                wall = time.monotonic() - t0
                text = client.files.content(batch.output_file_id).text
                gw.check_output(text, reqs, name)
                plan = next((e for e in gw.executor_events(log_path) if e["event"] == "plan"), {})
            row["samullm"] = {"measured_s": wall, "predicted_s": plan.get("predicted_makespan_s"),
                              "lower_bound_s": plan.get("lower_bound_s"),
                              "hit_rate": rate(*measured_hits(text)), "load": load}
            print(f"  samullm    {wall:6.1f} s (predicted {row['samullm']['predicted_s']}), hit "
                  f"rate {row['samullm']['hit_rate']} (simulated {row['simulated_hit_rate']})",
                  flush=True)
        if not args.no_anchor:
            load = gw.wait_quiet(args.max_load, args.max_wait)
            total, per = mk.run_anchor(root, paths, reqs, f"prefix-{name}")
            row["run_batch"] = {"measured_s": total, "per_model_s": per, "load": load,
                                "hit_rate": rate(*run_batch_hits(root, f"prefix-{name}", models))}
            print(f"  run_batch  {total:6.1f} s ({', '.join(f'{m} {t:.1f}' for m, t in per.items())})"
                  f", hit rate {row['run_batch']['hit_rate']}", flush=True)
        results.append(row)
        out_path.write_text(json.dumps(results, indent=1, default=str))
    print()
    for line in table(results):
        print(line)
    return 0


def table(results: list[dict]) -> list[str]:
    out = ["| workload | samullm s | predicted s | error | bound s | measured / bound | run_batch s | "
           "samullm vs run_batch | hit rate measured | simulated | run_batch's |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results:
        ours, anchor = row.get("samullm", {}), row.get("run_batch", {})
        if "batches" in ours:
            for k, b in enumerate(ours["batches"], 1):
                out.append(f"| {row['workload']} #{k} ({b['engine_starts']} engine starts) | "
                           f"{b['measured_s']:.1f} | – | – | – | – | "
                           f"{anchor.get('measured_s', float('nan')):.1f} | "
                           f"{_speed(anchor, b)} | {b['hit_rate']} | "
                           f"{row['simulated_hit_rate']} | {anchor.get('hit_rate')} |")
            continue
        pred, meas = ours.get("predicted_s"), ours.get("measured_s")
        err = f"{(pred - meas) / meas:+.0%}" if pred and meas else "–"
        out.append(f"| {row['workload']} | {meas:.1f} | {f'{pred:.1f}' if pred else '–'} | {err} | "
                   f"{mk.bound_cells(meas, ours.get('lower_bound_s'))} | "
                   f"{anchor.get('measured_s', float('nan')):.1f} | {_speed(anchor, ours)} | "
                   f"{ours.get('hit_rate')} | {row['simulated_hit_rate']} | "
                   f"{anchor.get('hit_rate')} |")
    return out


def _speed(anchor: dict, ours: dict) -> str:
    a, o = anchor.get("measured_s"), ours.get("measured_s")
    return f"{a / o:.2f}×" if a and o else "–"


if __name__ == "__main__":
    raise SystemExit(main())
