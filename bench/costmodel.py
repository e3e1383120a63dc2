"""Cost-model accuracy on this machine: predicted vs measured time for a real engine to finish a set.

For each (model, TP) case: profile the model (`tools.profiler`, reused from the state dir when
present), draw a request set from the real traces (`<data>/traces/`, lengths scaled to the model's
context), run it on a real api_server engine (`runtime.engines.engine.Engine`; prompts sent as token ids and
`ignore_eos` + `max_tokens` = the drawn output length, so prediction and measurement see the same
lengths), and compare with `scheduler.simulator.simulate` under the profiled latency model, excluding
and including engine start-up. The prediction adds the profile's cold-shape cost (a fresh engine's
first steps of each size are slow; `scheduler.calibration`) for the step sizes the set runs; the
bench engine is fresh and gets no warm-up, as the runtime's engines. Also reports simulation speed
(requests simulated per second).

Engines run eager (`enforce_eager`), as the runtime's configs start them (`conf/default.toml`; a
compiled CPU engine costs 50-90 s more to start); `--compiled` measures compiled engines instead. A
stored profile is reused only if it was measured with the same engine arguments and step timing.
Each row carries the 1-minute load average: on a shared machine the figures move with it.

    .venv/bin/python -m bench.costmodel --data ../shared/data [--cases tiny:1,small:1,medium:1,tiny:2]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from runtime.config import Config, DevicesConfig, ModelConfig, ServerConfig
from runtime.engines.engine import Engine, EngineSpec
from tools.profiler import profile_model, read_steps
from runtime.persist import load_profile
from tools.tinymodel import write_tiny_model
from scheduler.calibration import ServedCalibration
from scheduler.latency import fit_latency_model
from scheduler.simulator import EngineLimits, kv_blocks, simulate
from scheduler.types import ModelSpec, SimRequest

MODELS = {  # name -> tiny-model arguments (hidden 128/2 layers, 256/4, 512/8)
    "tiny": dict(layers=2, hidden=128, heads=2, kv_heads=1, seed=0),
    "small": dict(layers=4, hidden=256, heads=4, kv_heads=2, seed=1),
    "medium": dict(layers=8, hidden=512, heads=8, kv_heads=2, seed=2),
}
MAX_MODEL_LEN, MAX_SEQS, MAX_BATCHED = 1024, 32, 1024
KV_GIB = 0.25


def bench_config(root: Path, eager: bool) -> Config:
    models = []
    for name, args in MODELS.items():
        path = root / "models" / name
        if not (path / "config.json").exists():
            write_tiny_model(path, **args)
        models.append(ModelConfig(name=name, path=str(path), max_model_len=MAX_MODEL_LEN,
                                  max_num_seqs=MAX_SEQS, max_num_batched_tokens=MAX_BATCHED,
                                  engine_args={"enforce_eager": True} if eager else {}))
    cfg = Config(server=ServerConfig(state_dir=str(root / "state")), models=models,
                 devices=DevicesConfig(kind="cpu", cpu_kvcache_gib=KV_GIB))
    cfg.validate()
    return cfg


def trace_lengths(data: Path, n: int, seed: int, scale: float) -> list[tuple[int, int]]:
    """n (prompt, output) pairs from the conversation trace, scaled and clipped to the context."""
    with open(data / "traces" / "splitwise_conv.csv") as f:
        rows = [(int(r["num_prefill_tokens"]), int(r["num_decode_tokens"])) for r in csv.DictReader(f)]
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.choice(len(rows), size=n, replace=False):
        p, o = rows[i]
        p = max(4, min(int(p * scale), MAX_MODEL_LEN // 2))
        o = max(1, min(int(o * scale), MAX_MODEL_LEN - p - 1))
        out.append((p, o))
    return out


def model_spec(cfg: Config, name: str) -> ModelSpec:
    m = cfg.model(name)
    assert m is not None
    a = m.architecture(cfg.base_dir)
    return ModelSpec(name, a.num_layers, a.hidden_size, a.num_heads, a.num_kv_heads,
                     a.intermediate_size, a.vocab_size, dtype_bytes=m.dtype_bytes,
                     max_model_len=m.max_model_len, max_num_seqs=m.max_num_seqs,
                     max_num_batched_tokens=m.max_num_batched_tokens)


async def run_real(cfg: Config, name: str, tp: int, lengths: list[tuple[int, int]],
                   log_dir: Path) -> tuple[float, float]:
    """(start-up seconds, seconds to finish the set) on a real engine."""
    m = cfg.model(name)
    assert m is not None
    spec = EngineSpec(model=m, model_path=m.resolved_path(cfg.base_dir), devices=tuple(range(tp)),
                      tp=tp, kv_cache_gib=KV_GIB, log_path=log_dir / f"{name}-tp{tp}.log")
    engine = Engine(spec)
    await engine.start(900)
    try:
        rng = np.random.default_rng(1)
        bodies = [{"model": name, "prompt": [int(x) for x in rng.integers(10, 2000, p)],
                   "max_tokens": o, "ignore_eos": True, "temperature": 1.0} for p, o in lengths]
        # No warm-up request: the runtime dispatches its work to a just-started engine, so the
        # first steps' one-off costs belong to the measured time as they do to the runtime's.
        t0 = time.perf_counter()
        results = await asyncio.gather(*(engine.post("/v1/completions", b) for b in bodies))
        elapsed = time.perf_counter() - t0
        bad = [r for r in results if r[0] != 200]
        if bad:
            raise RuntimeError(f"{len(bad)} requests failed: {bad[0]}")
        assert all(r[1]["usage"]["completion_tokens"] == o for r, (_, o) in zip(results, lengths))
        return engine.start_time_s or 0.0, elapsed
    finally:
        await engine.stop()


def profile_matches(cfg: Config, name: str, meta: dict) -> bool:
    """A stored profile describes this bench's engines: same engine args (eager vs compiled) and
    engine-core step timing (profiles from before `timing` was recorded timed whole LLM steps),
    calibrated against a served engine (`served_calibration`, see tools.profiler)."""
    m = cfg.model(name)
    assert m is not None
    return (meta.get("engine_args") == dict(m.engine_args) and meta.get("timing") == "core_s"
            and "new_shape_s" in meta.get("served_calibration", {}))


def limits_for(cfg: Config, name: str, tp: int) -> EngineLimits:
    spec = model_spec(cfg, name)
    return EngineLimits(MAX_SEQS, MAX_BATCHED, MAX_MODEL_LEN,
                        kv_blocks(spec, tp, int(KV_GIB * (1 << 30))))


def predict(cfg: Config, name: str, tp: int, lengths: list[tuple[int, int]], latency) -> float:
    reqs = [SimRequest(i, p, o) for i, (p, o) in enumerate(lengths)]
    return simulate(reqs, limits_for(cfg, name, tp), latency).total_time_s


def cold_extra(cfg: Config, name: str, tp: int, lengths: list[tuple[int, int]], prof) -> float:
    """Seconds the bench's fresh engine adds for step sizes it runs for the first time (the
    profile's served calibration, `scheduler.calibration`); 0 for profiles without it."""
    cal = prof.meta.get("served_calibration")
    if cal is None:
        return 0.0
    return ServedCalibration.from_dict(cal).cold_extra(limits_for(cfg, name, tp), lengths,
                                                       prof.latency)


def sim_speed(cfg: Config, latency, data: Path) -> float:
    lengths = trace_lengths(data, 10_000, 7, 0.25)
    t0 = time.perf_counter()
    predict(cfg, "tiny", 1, lengths, latency)
    return len(lengths) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data", type=Path)
    ap.add_argument("--root", default=".samullm/bench-costmodel", type=Path)
    ap.add_argument("--cases", default="tiny:1,small:1,medium:1,tiny:2,small:2,medium:2")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--scale", type=float, default=0.25, help="trace lengths x this (4k -> 1k ctx)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eager", action="store_true", help="(the default) --enforce-eager engines")
    ap.add_argument("--compiled", action="store_true", help="torch.compile'd engines, not eager")
    ap.add_argument("--quick-profile", action="store_true")
    ap.add_argument("--reprofile", action="store_true")
    ap.add_argument("--reuse-sweep", action="store_true",
                    help="when (re)profiling, refit the stored sweep steps; re-measure start + check")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    cfg = bench_config(args.root, eager=not args.compiled)
    rows = []
    for case in args.cases.split(","):
        name, tp = case.split(":")[0], int(case.split(":")[1])
        prof = None if args.reprofile else load_profile(cfg.state_dir, name, tp, "cpu")
        if prof is not None and not profile_matches(cfg, name, prof.meta):
            prof = None
        if prof is None:
            prof = profile_model(cfg, name, tp, quick=args.quick_profile,
                                 reuse_sweep=args.reuse_sweep)
        load_before = os.getloadavg()[0]
        lengths = trace_lengths(args.data, args.requests, args.seed, args.scale)
        pred_warm = predict(cfg, name, tp, lengths, prof.latency)
        cold = cold_extra(cfg, name, tp, lengths, prof)
        pred = pred_warm + cold
        # diagnostic: the same steps fitted on whole LLM-step times (output processing included)
        steps = cfg.state_dir / "profiles" / "work" / f"steps-{name}-tp{tp}.json"
        pred_step = (predict(cfg, name, tp, lengths, fit_latency_model(read_steps(steps, "step_s")))
                     if steps.exists() else None)
        start_s, meas = asyncio.run(run_real(cfg, name, tp, lengths, args.root / "logs"))
        rows.append({"case": f"{name} tp={tp}", "requests": len(lengths), "pred_s": pred,
                     "pred_warm_s": pred_warm, "cold_s": cold,
                     "pred_step_s": pred_step, "load_1m": max(load_before, os.getloadavg()[0]),
                     "profile_load_1m": prof.meta.get("loadavg_1m"), "start_s": start_s,
                     "profile_start_s": prof.latency.load_time_s,
                     "meas_s": meas, "err": (pred - meas) / meas,
                     "pred_total_s": pred + prof.latency.load_time_s, "meas_total_s": meas + start_s,
                     "err_total": (pred + prof.latency.load_time_s - meas - start_s) / (meas + start_s),
                     "fit_median_err": prof.meta.get("median_abs_rel_err")})
        _print(rows[-1:], header=len(rows) == 1)
        if args.json:  # after every case: a long run interrupted keeps what it measured
            args.json.write_text(json.dumps(rows, indent=2))
    errs = [abs(r["err"]) for r in rows]
    print(f"\nexcluding start-up: median |error| {statistics.median(errs):.1%}, worst {max(errs):.1%}")
    errs_t = [abs(r["err_total"]) for r in rows]
    print(f"including start-up: median |error| {statistics.median(errs_t):.1%}, "
          f"worst {max(errs_t):.1%}")
    prof = load_profile(cfg.state_dir, "tiny", 1, "cpu")
    if prof is not None:
        print(f"simulation speed: {sim_speed(cfg, prof.latency, args.data):,.0f} requests/s "
              f"(10,000 trace requests, tiny tp=1)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def _print(rows: list[dict], header: bool) -> None:
    if header:
        print(f"{'case':<14}{'reqs':>5}{'cold s':>7}{'pred s':>9}{'meas s':>9}{'error':>8}"
              f"{'pred+start':>12}{'meas+start':>12}{'error':>8}{'fit|err|':>9}{'load':>6}",
              flush=True)
    for r in rows:
        print(f"{r['case']:<14}{r['requests']:>5}{r.get('cold_s', 0.0):>7.2f}{r['pred_s']:>9.2f}{r['meas_s']:>9.2f}"
              f"{r['err']:>+8.1%}{r['pred_total_s']:>12.1f}{r['meas_total_s']:>12.1f}"
              f"{r['err_total']:>+8.1%}{(r['fit_median_err'] or 0):>9.1%}{r['load_1m']:>6.1f}",
              flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
