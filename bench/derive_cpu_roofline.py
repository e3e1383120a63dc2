"""Fit the CPU roofline's constants (`scheduler.latency.DEVICE_ROOFLINE["cpu"]`) to measured profiles.

    .venv/bin/python -m bench.derive_cpu_roofline [--root .samullm/bench-makespan]

A gateway with no profile plans a CPU model from `analytic_latency_model`: per step
`W/tp/bw + fixed` (reading the weights), `F/tp/flops` per token (GEMMs), `4·h·L/tp/flops` per
prefill attention pair, `kv(tp)/bw` per decoded context token, `per_seq` per running sequence, and
at TP > 1 the all-reduces (`2·L·h·dtype·2·(tp−1)/tp/bw` per token, `2·L·k_ar` per step). All are
linear in x = (1/flops, 1/bw, fixed, per_seq, k_ar), so x is fitted by non-negative least squares
on relative error to what the profiles (`samullm profile`: the in-process sweep scaled by the served
calibration, i.e. what the planner uses when a profile exists) predict for a grid of typical steps
(decode batches of 1–32 at 64–768 context tokens, prefill chunks of 16–1024 tokens), over every
stored TP-1 and TP-2 profile at one core per rank. One set of constants for all models, so it
carries to architectures that were never profiled. Prints the constants and each profile's error
on the grid; paste them into `scheduler/latency.py` with the date and the profiles' source.

Then the threads exponents (`scheduler.latency.CPU_THREADS_EXPONENTS`): each stored 2-thread
profile against the same model's 1-thread one, on the same grid, as the 1-thread step split into
compute (c1, c2), memory (c3 and the weight-reading share of c0) and fixed (the rest of c0, c4)
seconds, each divided by its own gain (non-negative least squares on relative error); the
exponents are log2 of the gains.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runtime.config import load_config  # noqa: E402
from runtime.executor.planning import model_specs  # noqa: E402
from runtime.persist import load_profiles  # noqa: E402
from scheduler.latency import (CPU_THREADS_EXPONENTS, DEVICE_ROOFLINE,  # noqa: E402
                               analytic_latency_model, assumed_threads_latency,
                               weight_read_share)

# (tokens, prefill attention pairs, decode context tokens, sequences) of typical steps
DECODE = [(b, 0, b * ctx, b) for b in (1, 4, 8, 16, 32) for ctx in (64, 256, 768)]
PREFILL = [(n, n * n / 2, 0, 1) for n in (16, 64, 256, 1024)]
STEPS = DECODE + PREFILL


def features(spec, tp: int, step: tuple) -> list[float]:
    """The step time's coefficients of x = (1/flops, 1/bw, fixed, per_seq, k_ar)."""
    n, pairs, ctx, seqs = step
    ar_bytes = 2 * spec.num_layers * spec.hidden_size * spec.dtype_bytes * 2 * (tp - 1) / tp
    return [spec.flops_per_token / tp * n + 4.0 * spec.hidden_size * spec.num_layers / tp * pairs,
            spec.weight_bytes / tp + spec.kv_bytes_per_token(tp) * ctx + ar_bytes * n,
            1.0, float(seqs), 2.0 * spec.num_layers if tp > 1 else 0.0]


def measured(lat, step: tuple) -> float:
    n, pairs, ctx, seqs = step
    return lat.iteration_time(n, pairs, ctx, seqs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=REPO / ".samullm" / "bench-makespan")
    args = ap.parse_args(argv)
    cfg = load_config(args.root / "fresh.toml")
    specs = model_specs(cfg, "cpu")
    profiles = [p for p in load_profiles(args.root / "state").values()
                if p.device == "cpu" and p.threads == 1 and p.model in specs
                and not p.meta.get("copied_from")]
    if not profiles:
        print(f"no CPU profiles under {args.root / 'state'}", file=sys.stderr)
        return 1
    rows, ys = [], []
    for p in profiles:
        for step in STEPS:
            y = measured(p.latency, step)
            rows.append(np.array(features(specs[p.model], p.tp, step)) / y)
            ys.append(1.0)
    x, _ = nnls(np.array(rows), np.array(ys))
    inv_flops, inv_bw, fixed, per_seq, k_ar = x
    print(f"profiles: {', '.join(sorted(f'{p.model} tp{p.tp}' for p in profiles))}")
    print(f"fitted: flops {1 / inv_flops:.3e} FLOP/s, bw {1 / inv_bw:.3e} B/s, fixed {fixed:.3e} s, "
          f"per_seq {per_seq:.3e} s, all-reduce per layer {k_ar:.3e} s")
    print(f"was:    flops {DEVICE_ROOFLINE['cpu'][0]:.3e}, bw {DEVICE_ROOFLINE['cpu'][1]:.3e}, "
          f"fixed {DEVICE_ROOFLINE['cpu'][2]:.3e}, per_seq {DEVICE_ROOFLINE['cpu'][3]:.3e}")
    print("\nper profile, grid step time predicted / profiled (median, worst):")
    for p in sorted(profiles, key=lambda p: (p.model, p.tp)):
        spec = specs[p.model]
        old = analytic_latency_model(spec, p.tp, "cpu")
        fit = [float(np.dot(features(spec, p.tp, s), x)) / measured(p.latency, s) for s in STEPS]
        was = [measured(old, s) / measured(p.latency, s) for s in STEPS]
        print(f"  {p.model:7s} tp{p.tp}: fitted {np.median(fit):.2f} (worst "
              f"{max(fit, key=lambda r: abs(np.log(r))):.2f}); old roofline {np.median(was):.2f} "
              f"(worst {max(was, key=lambda r: abs(np.log(r))):.2f})")
    fit_threads(specs, load_profiles(args.root / "state").values())
    return 0


def threads_parts(lat, spec, step: tuple) -> list[float]:
    """A 1-thread step's (compute, memory, fixed) seconds (`assumed_threads_latency`'s split)."""
    n, pairs, ctx, seqs = step
    share = weight_read_share(spec, 1)
    return [lat.c1 * n + lat.c2 * pairs, lat.c3 * ctx + lat.c0 * share,
            lat.c0 * (1.0 - share) + lat.c4 * seqs]


def fit_threads(specs, profiles) -> None:
    """Print the fitted `CPU_THREADS_EXPONENTS` and each model's error on the grid."""
    by = {(p.model, p.tp, p.threads): p.latency for p in profiles
          if p.device == "cpu" and p.model in specs and not p.meta.get("copied_from")}
    pairs = [(m, by[(m, 1, 1)], by[(m, 1, 2)]) for m in sorted(specs)
             if (m, 1, 1) in by and (m, 1, 2) in by]
    if not pairs:
        print("\nno 2-thread profile beside a 1-thread one: threads exponents not fitted")
        return
    rows = [np.array(threads_parts(one, specs[m], s)) / measured(two, s)
            for m, one, two in pairs for s in STEPS]
    inv, _ = nnls(np.array(rows), np.ones(len(rows)))
    exps = tuple(float(-np.log2(x)) if x > 0 else float("inf") for x in inv)
    print(f"\nthreads exponents (compute, memory, fixed): {tuple(round(e, 2) for e in exps)}; "
          f"was {CPU_THREADS_EXPONENTS}")
    print("per model, 2-thread grid step time predicted / profiled (median, worst):")
    for m, one, two in pairs:
        fit = [float(np.dot(threads_parts(one, specs[m], s), inv)) / measured(two, s) for s in STEPS]
        now = [measured(assumed_threads_latency(one, specs[m], 1, 2), s) / measured(two, s)
               for s in STEPS]
        print(f"  {m:7s}: fitted {np.median(fit):.2f} (worst "
              f"{max(fit, key=lambda r: abs(np.log(r))):.2f}); current {np.median(now):.2f}")


if __name__ == "__main__":
    sys.exit(main())
