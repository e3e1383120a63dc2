"""Online calibration: the latency model corrected by what the engines served.

Every request an engine answers is an observation of its engine's speed; `scheduler.served` keeps
a bounded window of them per engine shape (model, tp, threads, device kind).

Model: the two scales of the profiler's served calibration (`scheduler.calibration`), token_scale
on the per-token terms and step_scale on the per-step terms of the shape's *base* model (its
profile when `samullm profile` measured one, else the GPU operator model or the roofline). Two
numbers per shape are few enough to be fitted from the first answers of one batch, and they are
what differs between a base and a served engine (the roofline's per-step overhead of a CPU engine,
a profile's in-process steps against an API server's).

Fit (`fit_shape`): a run is cut into busy periods (the engine always had a request in flight);
each period is replayed by the simulator, every request arriving when it entered the queue (not
before the period began). The executor keeps 1.5 × max_num_seqs requests in flight, so a request
that waited in the shared queue because the engine was full waits in the replayed engine's queue,
as the planner's simulation has it. A replayed finish time is idle + token_scale·P + step_scale·D,
with P and D the per-token and per-step seconds (base model) of the iterations up to it and idle the
time the replayed engine waited for an arrival: linear in the scales for a given schedule. The k-th
measured answer of a period is matched with its k-th replayed finish (the progress curve: answers
of equal work may come in any order), least squares in seconds relative to the period's length,
each period weighted by its share of the time, within SCALE_BOUNDS, with weak pulls toward
token_scale = step_scale (what requests of one shape cannot tell apart moves both alike) and
toward 1. Over a profile the first pull is stronger (PROFILE_EQUAL_WEIGHT): the profile measured
the split at many batch sizes, while a batch of like requests, its waves and their sub-waves, told
it apart only by what the replay does not model; a 1e-4 pull let those push `medium`'s fits to
0.5x per token and 3.5x per step from its first 64-160 answers, and the rest of its run came out
13-14 % long (median over 26 runs; 6 % with the stronger pull: `bench/early_fit.py`). When
requests arrive while the engine runs, the schedule depends on the scales: the fit is replayed
again under the new ones (at most FIT_ROUNDS); when every request was queued from the
start (a batch's requests wait for its engine to start) the first round is exact.

A fresh engine pays one-off costs, then runs as a warm one (`scheduler.calibration`: a CPU engine
runs each new step token count slowly once, ~90 ms each; at TP 2 its first request takes seconds).
Two hypotheses are tried after the plain fit, each kept only when it fits COLD_GAIN times better (a
more flexible model would absorb any mismatch of the replay): `new_shape_s` per token count a fresh
engine's replayed steps run for the first time (a third column, N, of the same least squares), and
`first_s`, the lateness of a fresh engine's first answer (its first period then matched from that
answer on). The planner charges both with an engine's start (`ShapeFit.cold_s`).

Requests still in flight when the window is taken (`scheduler.served.Pending`) are replayed beside
the answers, to their output caps, and never matched: the last answers shared their steps with
them (a wave's prefill ran between two decode steps), and a replay without them read those
answers' lateness as per-step cost: `medium`'s first wave read as 0.02x per token and 5.5x per
step, and over 17 runs the rest of its run came out 0.39-1.47x (median 1.19x) of what it took;
0.95-1.22x (1.06x) with them (6 Dec 2026; `bench/early_fit.py`).

A run whose middle was dropped from the window (`scheduler.served`) is replayed as two: its start,
matched up to the first dropped request's send, and its newest requests, whose first ones queued
behind dropped ones: matched from the answer after those (times relative to it), not from its start.

Shapes never served are corrected from the fits of shapes that were (`scheduler.unserved`).
Pure: no I/O, no clock.

Why end-to-end times and not vLLM's own per-request metrics or `/metrics`: the executor's clock
sees every engine of every kind alike, and a request's end-to-end time (queueing in the engine,
API server included) is exactly what the planner's simulation predicts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.optimize import lsq_linear

from scheduler.calibration import scale_latency
from scheduler.latency import LatencyModel
from scheduler.served import (Period, ShapeKey, ShapeWindow, busy_periods, run_from_dict,
                              run_to_dict)
from scheduler.simulator import EngineLimits, SimResult, simulate

MIN_SERVED = 8  # answers matched before a shape's fit is used
FIT_ROUNDS = 4
SCALE_BOUNDS = (0.02, 50.0)  # against a roofline, not a profile: wider than the profiler's
EQUAL_WEIGHT = 1e-4  # pull toward token_scale = step_scale (relative to all the data's weight 1)
# the same over a profile, which measured the per-token/per-step split at many batch sizes on this
# machine: what like requests cannot tell apart stays as the profile has it (`fit_shape`)
PROFILE_EQUAL_WEIGHT = 3e-2
PRIOR = 1e-6  # pull of the scales toward 1: only to keep the problem well posed
COLD_GAIN = 0.25  # fresh engines are taken to pay a start cost when that fits 4x better
NEW_SHAPE_MAX_S = 2.0  # bound on a fresh engine's one-off cost per token count (measured ~0.09 s)
# a period matched from an answer on is evidence only where its replay (under the scales so far)
# spans at least this share of what was measured after that answer (`_rounds`)
MIN_REPLAYED = 0.1


@dataclass(frozen=True)
class ShapeFit:
    """A shape's fitted scales over its base model, and the evidence."""

    token_scale: float
    step_scale: float
    served: int  # answers matched
    periods: int
    measured_s: float  # Σ over periods of the last answer's time from the period's start (a
    # trimmed run's first period: from the answer its matching starts after)
    before_s: float  # the same, replayed under the base model
    after_s: float  # replayed under the fitted scales (the last round)
    kind: str  # the base's kind ("profile", "roofline", ...)
    base: tuple[float, ...]  # the base's coefficients (another base: the fit is redone)
    seen: int  # ShapeWindow.seen when fitted
    # a fresh engine's one-off costs (charged with its start, as a profile's cold cost is:
    # `runtime.executor.latency_source.LatencySource`): the delay of its first answers, and
    # new_shape_s for each token count it runs a step of the first time, `shapes` of them
    first_s: float = 0.0
    new_shape_s: float = 0.0
    shapes: int = 0

    @property
    def cold_s(self) -> float:
        return self.first_s + self.new_shape_s * self.shapes

    def replay_errors(self) -> tuple[float, float]:
        """Signed relative errors of the replayed time under the base, and under the fit."""
        m = self.measured_s
        return (self.before_s - m) / m, (self.after_s - m) / m

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "base": list(self.base)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShapeFit":
        return cls(float(d["token_scale"]), float(d["step_scale"]), int(d["served"]),
                   int(d["periods"]), float(d["measured_s"]), float(d["before_s"]),
                   float(d["after_s"]), str(d["kind"]), tuple(float(x) for x in d["base"]),
                   int(d["seen"]), float(d.get("first_s", 0.0)),
                   float(d.get("new_shape_s", 0.0)), int(d.get("shapes", 0)))


def coefficients(model: LatencyModel) -> tuple[float, ...]:
    """What a fit's scales apply to (the load time is not scaled)."""
    return (model.c0, model.c1, model.c2, model.c3, model.c4, model.allreduce_s_per_token,
            model.allreduce_fixed_s)


def windows_to_dict(windows: Mapping[ShapeKey, ShapeWindow],
                    fits: Mapping[ShapeKey, ShapeFit]) -> dict[str, Any]:
    """JSON-able: per shape its runs (times from the run's first send, µs) and its fit."""
    shapes = []
    for key in sorted(set(windows) | set(fits)):
        w = windows.get(key, ShapeWindow((), 0))
        fit = fits.get(key)
        shapes.append({"model": key[0], "tp": key[1], "threads": key[2], "device": key[3],
                       "seen": w.seen, "runs": [run_to_dict(r) for r in w.runs],
                       "fit": fit.to_dict() if fit else None})
    return {"version": 1, "shapes": shapes}


def windows_from_dict(d: dict[str, Any]
                      ) -> tuple[dict[ShapeKey, ShapeWindow], dict[ShapeKey, ShapeFit]]:
    """The inverse of `windows_to_dict`; raises KeyError/TypeError/ValueError on a bad file."""
    if d.get("version") != 1:
        raise ValueError(f"unknown calibration version {d.get('version')!r}")
    windows, fits = {}, {}
    for s in d["shapes"]:
        key = (str(s["model"]), int(s["tp"]), int(s["threads"]), str(s["device"]))
        windows[key] = ShapeWindow(tuple(run_from_dict(r) for r in s["runs"]), int(s["seen"]))
        if s.get("fit") is not None:
            fit = fits[key] = ShapeFit.from_dict(s["fit"])
            if not (all(math.isfinite(x) and x > 0 for x in (fit.token_scale, fit.step_scale))
                    and all(math.isfinite(x) and x >= 0 for x in (fit.first_s, fit.new_shape_s))):
                raise ValueError(f"{key}: scales must be positive numbers")
    return windows, fits


# --- the fit ---------------------------------------------------------------------------------
def _progress(res: SimResult, base: LatencyModel, a: float, b: float, seen: set[int] | None,
              pending: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per replayed finish, sorted, of all but the `pending` rids: (P, D, N, idle) with replayed
    finish = idle + a·P + b·D; N counts the steps up to it with a token count the engine had not
    run before (`seen`, updated; None: an engine whose start is not in the window, taken as
    warm)."""
    assert res.iterations is not None
    arr = np.array([(r.start_s, r.duration_s, r.num_tokens, r.prefill_attn_work,
                     r.decode_ctx_sum, r.batch_size) for r in res.iterations], dtype=float)
    start, dur, tok, work, ctx, batch = arr.T
    p = np.cumsum((base.c1 + base.allreduce_s_per_token) * tok + base.c2 * work)
    d = np.cumsum(base.c0 + base.allreduce_fixed_s + base.c3 * ctx + base.c4 * batch)
    new = np.zeros(len(tok))
    if seen is not None:
        counts, first = np.unique(tok.astype(np.int64), return_index=True)
        fresh = np.array([int(c) not in seen for c in counts], dtype=bool)
        new[first[fresh]] = 1.0
        seen.update(int(c) for c in counts)
    n = np.cumsum(new)
    ends = start + dur
    skip = set(pending)
    fin = np.sort(np.array([t for r, t in res.finish_times_s.items() if r not in skip],
                           dtype=float))
    k = np.clip(np.searchsorted(ends, fin), 0, len(ends) - 1)
    km = np.maximum(k - 1, 0)  # the nearest end (a jump's records add up their own rounding)
    k = np.where(np.abs(ends[km] - fin) < np.abs(ends[k] - fin), km, k)
    return p[k], d[k], n[k], fin - (a * p[k] + b * d[k])


def _matched(p: Period) -> int:
    return (len(p.measured) if p.upto is None else p.upto) - p.skip


def fit_shape(base: LatencyModel, kind: str, limits: EngineLimits, window: ShapeWindow
              ) -> ShapeFit | None:
    """The shape's scales over `base` from its window (see the module docstring); None with
    fewer than MIN_SERVED answers to match."""
    periods = [(ri, p) for ri, r in enumerate(window.runs) for p in busy_periods(r)
               if _matched(p) >= (2 if p.skip or p.fresh else 1)]
    fresh_runs = {ri for ri, r in enumerate(window.runs) if not r.trimmed}
    if sum(_matched(p) for _, p in periods) < MIN_SERVED:
        return None
    # the plain hypothesis first, then a fresh engine's one-off costs, each kept only when it
    # fits COLD_GAIN times better: a flexible model would absorb any mismatch of the replay
    eq = PROFILE_EQUAL_WEIGHT if kind.startswith("profile") else EQUAL_WEIGHT
    fit = _rounds(base, limits, periods, fresh_runs, set(), False, equal=eq)
    if fit is None:
        return None
    shaped = _rounds(base, limits, periods, fresh_runs, set(), True, fit.scales, equal=eq)
    if shaped is not None and shaped.scales[2] > 0 and shaped.cost < COLD_GAIN * fit.cost:
        fit = dataclasses.replace(shaped, before=fit.before)
    first_s = 0.0
    if fit.firsts:  # fresh engines answer late once, then run as warm ones
        cold = _rounds(base, limits, periods, fresh_runs, set(fit.firsts), fit.scales[2] > 0,
                       fit.scales, equal=eq)
        if cold is not None and cold.firsts:
            late = [x for x, _ in cold.firsts.values()]
            c = max(0.0, sum(late) / len(late))
            miss = sum((w * (x - c)) ** 2 for x, w in cold.firsts.values()) / 2
            if c > 0 and cold.cost + miss < COLD_GAIN * fit.cost:
                fit, first_s = dataclasses.replace(cold, before=fit.before), c
    a, b, shape_s = fit.scales
    return ShapeFit(a, b, fit.served, fit.used, fit.measured, fit.before,
                    fit.after + first_s * len(fit.firsts if first_s else ()), kind,
                    coefficients(base), window.seen, first_s, shape_s,
                    fit.shapes if shape_s > 0 else 0)


@dataclass(frozen=True)
class _Fit:
    scales: tuple[float, float, float]  # token_scale, step_scale, new_shape_s
    served: int
    used: int
    measured: float
    before: float  # replayed under the base (when started from (1, 1, 0))
    after: float  # replayed under `scales`
    cost: float  # the least-squares cost of the rows matched
    # fresh period -> (its first answer's excess over its replay, the period's row weight)
    firsts: dict[int, tuple[float, float]]
    shapes: int  # the most token counts a fresh engine of the window ran


def _rounds(base: LatencyModel, limits: EngineLimits, periods: Sequence[tuple[int, Period]],
            fresh_runs: set[int], cold: set[int], shapes: bool,
            scales: tuple[float, float, float] = (1.0, 1.0, 0.0), equal: float = EQUAL_WEIGHT
            ) -> _Fit | None:
    """Replay and solve until the scales settle; `cold` periods are matched from their first
    answer on; with `shapes`, the engines of `fresh_runs` (run indices) pay for every token count
    new to them (new_shape_s, else 0)."""
    before = math.nan
    a, b, sh = scales
    for rnd in range(FIT_ROUNDS):
        lat = scale_latency(base, a, b)
        blocks, fresh = [], []
        seen: dict[int, set[int]] = {ri: set() for ri in fresh_runs}
        after = measured = 0.0
        for i, (ri, p) in enumerate(periods):
            try:
                res = simulate(p.requests, limits, lat, record=True)
            except ValueError:  # a request this engine could not hold: not this shape's evidence
                continue
            pp, dd, nn, idle = _progress(res, base, a, b, seen.get(ri), p.pending)
            fin = idle + a * pp + b * dd + sh * nn  # the replayed finishes, sorted
            m = np.asarray(p.measured)
            lead = p.skip or int(i in cold)  # answers before the matched increments
            u, r = p.skip + _matched(p), lead - 1
            ref = (pp[r], dd[r], nn[r], idle[r], m[r]) if lead else (0.0,) * 5
            span = float(m[u - 1] - ref[4])
            if span <= 0:
                continue
            if lead and float(fin[u - 1] - fin[r]) < MIN_REPLAYED * span:
                # matched from an answer on, the replay has these answers come with it where
                # the engine gave them later: work the window never saw held its seats, a wave
                # the replay lacks. Fitted, such increments read as an engine many times slower
                # (28x from 16 answers of a woken `medium` engine, 6 Dec 2026): not evidence
                continue
            blocks.append((np.column_stack([pp - ref[0], dd - ref[1], nn - ref[2]])[lead:u],
                           ((m - ref[4]) - (idle - ref[3]))[lead:u], span))
            if p.fresh:
                fresh.append((i, float(m[0] - fin[0]), len(blocks) - 1))
            after += float(fin[u - 1] - (fin[r] if p.skip else 0.0))
            measured += float(m[u - 1] - (m[r] if p.skip else 0.0))
        if rnd == 0:
            before = after
        if not blocks:
            return None
        total = sum(span for _, _, span in blocks)
        weights = [math.sqrt(span / total) / (span * math.sqrt(max(1, len(y))))
                   for _, y, span in blocks]
        (na, nb, nsh), cost = _solve(blocks, weights, shapes, equal)
        done = (abs(na / a - 1) < 1e-3 and abs(nb / b - 1) < 1e-3
                and abs(nsh - sh) <= 1e-3 * max(sh, 1e-3))
        a, b, sh = na, nb, nsh
        if done:
            break
    return _Fit((a, b, sh), sum(len(y) for _, y, _ in blocks), len(blocks), measured, before,
                after, cost, {i: (late, weights[k]) for i, late, k in fresh},
                max((len(v) for v in seen.values()), default=0))


def _solve(blocks: Sequence[tuple[np.ndarray, np.ndarray, float]], weights: Sequence[float],
           shapes: bool, equal: float = EQUAL_WEIGHT) -> tuple[tuple[float, float, float], float]:
    """((token_scale, step_scale, new_shape_s), cost) for rows (P, D, N) -> seconds, each period's
    rows weighted (`weights`: its share of the time over its length: relative errors), with the
    weak pulls; without `shapes` the N column is left out (new_shape_s = 0)."""
    k = 3 if shapes else 2
    rows = [x[:, :k] * w for (x, _, _), w in zip(blocks, weights)]
    rhs = [y * w for (_, y, _), w in zip(blocks, weights)]
    q, e = PRIOR, equal
    rows.append(np.array([[q, 0.0, 0.0], [0.0, q, 0.0], [e, -e, 0.0], [0.0, 0.0, q]])[:, :k])
    rhs.append(np.array([q, q, 0.0, 0.0]))
    lo, hi = SCALE_BOUNDS
    sol = lsq_linear(np.vstack(rows), np.concatenate(rhs), method="bvls",
                     bounds=([lo, lo, 0.0][:k], [hi, hi, NEW_SHAPE_MAX_S][:k]))
    x = [float(v) for v in sol.x] + [0.0] * (3 - k)
    return (x[0], x[1], x[2]), float(sol.cost)


def refit(windows: Mapping[ShapeKey, ShapeWindow],
          bases: Mapping[ShapeKey, tuple[LatencyModel, str, EngineLimits]],
          fits: Mapping[ShapeKey, ShapeFit]) -> dict[ShapeKey, ShapeFit]:
    """Fits for every shape of `bases` (its base model, base kind and engine limits): the old one
    while its window and base are unchanged, else a new one. Shapes without a base here (another
    device kind, a model not configured) keep theirs. Returns `fits` itself when nothing changed."""
    out = {k: f for k, f in fits.items() if k not in bases}
    for key, (base, kind, limits) in bases.items():
        w = windows.get(key)
        old = fits.get(key)
        if w is None:
            if old is not None:
                out[key] = old
            continue
        if old is not None and (old.seen, old.kind, old.base) == (w.seen, kind, coefficients(base)):
            out[key] = old
            continue
        new = fit_shape(base, kind, limits, w)
        if new is not None:
            out[key] = new
    return fits if out == fits else out  # type: ignore[return-value]
