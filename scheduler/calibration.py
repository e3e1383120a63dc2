"""Served-engine calibration: scale a fitted latency model so it predicts a *served* engine.

The profiler fits c0..c4 to engine-core steps timed in-process. A served engine (api_server + engine
core + workers) pays more, and not uniformly: on this 2-core machine, at TP 2 the API server and
engine-core processes have no core of their own and prefill-heavy work slows most; on a tiny model
per-step Python overhead dominates. So the started engine serves a few synthetic request sets of
different shapes, timed end to end, and two multiplicative scales are fitted:

- `token_scale` on the per-token terms (c1, c2, all-reduce per token): prefill-heavy work;
- `step_scale` on the per-step terms (c0, c3, c4, all-reduce fixed): decode-heavy work.

Every request of a set is queued at time 0, so the schedule the simulator produces does not depend
on the latency model; the simulated total is then exactly `token_scale·P + step_scale·D`, where P
and D are the totals simulated with only the per-token, resp. only the per-step terms. Fitting the
scales to relative errors of the totals is a small non-negative linear least squares problem,
solved exactly; `simulate` under the scaled model confirms it (the "after" errors).

Cold shapes: a fresh CPU engine pays a one-off cost the first time it runs a step with a token
count it has not run before (measured here: ~90 ms per new count for the small model at TP 2,
the same per count on two different sets; the first run of a 64-request set took 2x its second).
At TP 2 the very first request of a fresh engine also pays a fixed few seconds (tiny/small
models: ~5 s on prefill sets that warm take 0.4-1.4 s; ~0.05 s at TP 1). The scales are fitted to
warm runs (each set's fastest repeat); `new_shape_s` to the later sets' first-run excess per token
count new to the engine (sets run in order on one engine), and `first_request_s` to what is left of
the first set's. `cold_extra` predicts both for a set sent to a fresh engine.
Pure: no I/O, no wall clock.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np
from scipy.optimize import lsq_linear

from scheduler.latency import LatencyModel
from scheduler.simulator import EngineLimits, simulate
from scheduler.types import SimRequest

# Scales outside this range mean the calibration measured something else (a stalled machine, a
# failed engine); they are clipped so one bad run cannot make a profile absurd.
SCALE_BOUNDS = (0.1, 20.0)
# Weak pull of each scale toward 1 (relative to one set's weight): keeps the problem well posed
# when the sets cannot tell the two groups apart (e.g. a model whose fit has c1 = c2 = 0).
PRIOR_WEIGHT = 1e-3


@dataclass(frozen=True)
class CalibrationSet:
    """A synthetic request set served by a real engine: (prompt, output) pairs, all sent at once,
    and the measured seconds to finish them all."""

    name: str
    requests: tuple[tuple[int, int], ...]
    measured_s: float  # warm: fastest repeat
    first_s: float | None = None  # the set's first run on the engine (cold shapes), when measured


@dataclass(frozen=True)
class SetFit:
    """One set's simulated totals before and after scaling, and their signed relative errors."""

    name: str
    requests: int
    measured_s: float
    sim_before_s: float
    sim_after_s: float
    first_s: float | None = None
    new_shapes: int = 0  # token counts this set ran that no earlier set had

    @property
    def err_before(self) -> float:
        return (self.sim_before_s - self.measured_s) / self.measured_s

    @property
    def err_after(self) -> float:
        return (self.sim_after_s - self.measured_s) / self.measured_s


@dataclass(frozen=True)
class ServedCalibration:
    """Fitted scales and the per-set evidence; JSON-able for a profile's meta."""

    token_scale: float
    step_scale: float
    sets: tuple[SetFit, ...]
    new_shape_s: float = 0.0  # one-off seconds per token count new to a fresh engine
    first_request_s: float = 0.0  # one-off seconds of a fresh engine's first requests

    def apply(self, model: LatencyModel) -> LatencyModel:
        return scale_latency(model, self.token_scale, self.step_scale)

    def cold_extra(self, limits: EngineLimits, requests: Sequence[tuple[int, int]],
                   model: LatencyModel) -> float:
        """Seconds a fresh engine adds to `requests` (all queued at 0): its first requests and
        the token counts it runs for the first time."""
        return self.first_request_s + self.new_shape_s * len(token_shapes(limits, requests, model))

    def to_dict(self) -> dict[str, Any]:
        return {"token_scale": self.token_scale, "step_scale": self.step_scale,
                "new_shape_s": self.new_shape_s, "first_request_s": self.first_request_s,
                "sets": [{**asdict(s), "err_before": s.err_before, "err_after": s.err_after}
                         for s in self.sets]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ServedCalibration":
        sets = tuple(SetFit(str(s["name"]), int(s["requests"]), float(s["measured_s"]),
                            float(s["sim_before_s"]), float(s["sim_after_s"]),
                            None if s.get("first_s") is None else float(s["first_s"]),
                            int(s.get("new_shapes", 0))) for s in d["sets"])
        return cls(float(d["token_scale"]), float(d["step_scale"]), sets,
                   float(d.get("new_shape_s", 0.0)), float(d.get("first_request_s", 0.0)))


def scale_latency(model: LatencyModel, token_scale: float, step_scale: float) -> LatencyModel:
    """`model` with its per-token terms × token_scale and per-step terms × step_scale."""
    return replace(model, c1=model.c1 * token_scale, c2=model.c2 * token_scale,
                   allreduce_s_per_token=model.allreduce_s_per_token * token_scale,
                   c0=model.c0 * step_scale, c3=model.c3 * step_scale, c4=model.c4 * step_scale,
                   allreduce_fixed_s=model.allreduce_fixed_s * step_scale)


def _sim_total(requests: Sequence[tuple[int, int]], limits: EngineLimits,
               model: LatencyModel) -> float:
    reqs = [SimRequest(i, p, o) for i, (p, o) in enumerate(requests)]
    return simulate(reqs, limits, model).total_time_s


def token_shapes(limits: EngineLimits, requests: Sequence[tuple[int, int]],
                 model: LatencyModel) -> set[int]:
    """The distinct token counts of the steps that serve `requests` (all queued at time 0)."""
    res = simulate([SimRequest(i, p, o) for i, (p, o) in enumerate(requests)], limits, model,
                   record=True)
    assert res.iterations is not None
    return {it.num_tokens for it in res.iterations}


def split_totals(model: LatencyModel, limits: EngineLimits,
                 requests: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """(P, D): simulated seconds of the set under only the per-token, resp. per-step terms."""
    return (_sim_total(requests, limits, scale_latency(model, 1.0, 0.0)),
            _sim_total(requests, limits, scale_latency(model, 0.0, 1.0)))


def fit_served_scales(model: LatencyModel, limits: EngineLimits,
                      sets: Sequence[CalibrationSet]) -> ServedCalibration:
    """Scales (token, step) minimising Σ over sets of ((scaled simulated − measured) / measured)²,
    plus a weak pull toward 1 (PRIOR_WEIGHT), within SCALE_BOUNDS. Needs at least one set."""
    if not sets:
        raise ValueError("need at least one calibration set")
    if any(s.measured_s <= 0 for s in sets):
        raise ValueError("measured times must be positive")
    rows, rhs = [], []
    for s in sets:
        p, d = split_totals(model, limits, s.requests)
        rows.append([p / s.measured_s, d / s.measured_s])
        rhs.append(1.0)
    w = PRIOR_WEIGHT
    rows += [[w, 0.0], [0.0, w]]
    rhs += [w, w]
    sol = lsq_linear(np.array(rows), np.array(rhs), bounds=SCALE_BOUNDS, method="bvls")
    token_scale, step_scale = (float(x) for x in sol.x)
    scaled = scale_latency(model, token_scale, step_scale)
    # cold shapes: the first runs' excess over the warm ones, per token count new to the engine
    # (least squares through 0, never negative: a first run faster than the fastest is noise)
    seen: set[int] = set()
    new = []
    for s in sets:
        shapes = token_shapes(limits, s.requests, model)
        new.append(len(shapes - seen))
        seen |= shapes
    cold = [(n, s.first_s - s.measured_s) for n, s in zip(new, sets) if s.first_s is not None]
    later = cold[1:] if len(cold) > 1 else cold  # the first set also pays the first-request cost
    nn = sum(n * n for n, _ in later)
    new_shape_s = max(0.0, sum(n * g for n, g in later) / nn) if nn else 0.0
    first_request_s = (max(0.0, cold[0][1] - new_shape_s * cold[0][0])
                       if len(cold) > 1 and sets[0].first_s is not None else 0.0)
    fits = tuple(SetFit(s.name, len(s.requests), s.measured_s,
                        _sim_total(s.requests, limits, model),
                        _sim_total(s.requests, limits, scaled), s.first_s, n)
                 for s, n in zip(sets, new))
    return ServedCalibration(token_scale, step_scale, fits, new_shape_s, first_request_s)
