"""A lower bound on a pooled job's makespan, from the planner's own cost model.

No schedule of the work can end before

    max(area + start, solo)

- `alone`: the longest of the models, each alone at its best shape (the least run time over every
  shape the pool allows, all devices included): a model's requests must all be served, and no shape
  serves them sooner;
- `area`: the sum over models of each one's least device-seconds (min over shapes of devices used ×
  run time) divided by the pool's devices: every shape a model runs on holds its devices until
  the model is done, and the pool has only so many device-seconds;
- `start`: the least engine start the plan can be charged (a model whose engine runs and serves
  now: what is left of its start, 0 once it serves; else its cheapest (model, TP) load time as the
  planner prices a start alone in a ready spare): nothing is served before the first engine is up;
- `solo`: the most, over models, of the model's own least start plus its least run time: each
  model's engines must be up before it is served. It is at least `alone + start`, and tighter once
  one engine is warm (a warm engine makes `start` 0 while the other models still have to start).

Run times are the planner's own estimates (`scheduler.stages.Context.option` on the planner's
initial state, i.e. `scheduler.estimator` with the problem's calibrated latency), not a second
latency path; a bound is thus as good as the cost model. Both terms ignore restarts, the waiting of
one model for another's devices, start contention and spare imports, which only lengthen a plan.

Dependent requests (`scheduler.dag`): the runs are those of the resolved prompts with every
request released at once (a request waiting for another model's output is simulated as if it were
there already; same-model chains are kept), a relaxation of the real constraint, so the same bound
holds; the critical path through the models would only raise it.

Pure: no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from scheduler.placement import shape_devices, unpack
from scheduler.stages import Context, PlanState
from scheduler.stops import WAKE_S


@dataclass(frozen=True)
class ShapeCost:
    """One way to run a model, as the bound sees it."""

    devices: int  # devices the shape holds (tp × threads × dp)
    run_s: float  # time to serve the model's work once its engines are up
    start_s: float  # the least time before they are up (0: an engine of this shape serves now)


@dataclass(frozen=True)
class LowerBound:
    """`value_s` = max(`area_s` + `start_s`, `solo_s`) (see the module docstring); `solo_s` is
    never below `alone_s` + `start_s`."""

    alone_s: float
    area_s: float
    start_s: float
    solo_s: float = 0.0

    @property
    def value_s(self) -> float:
        return max(max(self.alone_s, self.area_s) + self.start_s, self.solo_s)


def lower_bound(costs: Mapping[str, Sequence[ShapeCost]], devices: int) -> LowerBound:
    """The bound for models with work, each with the costs of its shapes, on `devices` devices.
    A model without shapes cannot be planned: ValueError."""
    if devices < 1:
        raise ValueError("a pool has at least one device")
    empty = sorted(m for m, cs in costs.items() if not cs)
    if empty:
        raise ValueError(f"no shape for {', '.join(empty)}")
    if not costs:
        return LowerBound(0.0, 0.0, 0.0)
    alone = max(min(c.run_s for c in cs) for cs in costs.values())
    area = sum(min(c.devices * c.run_s for c in cs) for cs in costs.values()) / devices
    start = min(c.start_s for cs in costs.values() for c in cs)
    solo = max(min(c.start_s for c in cs) + min(c.run_s for c in cs) for cs in costs.values())
    return LowerBound(alone, area, start, solo)


def shape_costs(ctx: Context, state: PlanState) -> dict[str, list[ShapeCost]]:
    """Per model with work at `state`, every feasible shape's cost from `ctx`'s estimator (the
    runs the planner ranks its options with, read from its caches when it ran them already). A
    start is priced alone (`Context.start_s` with one engine starting) and in a ready spare; a
    running engine of that very shape owes only what is left of its start (`PlanState.warmup`),
    and one asleep in that shape its wake (`stops.WAKE_S`)."""
    out: dict[str, list[ShapeCost]] = {}
    for m in sorted(state.work):
        rows = []
        for shape in ctx.shapes(m):
            _, tp, dp, th = unpack(shape)
            opt = ctx.option(state, shape)
            cur = state.running.get(m)
            kept = cur is not None and cur.fits_in(tp, dp, th)
            asleep = state.asleep.get(m)
            wakes = asleep is not None and asleep.fits_in(tp, dp, th)
            start = (state.warmup.get(m, 0.0) if kept else WAKE_S if wakes
                     else ctx.start_s(m, tp, 1, th))
            rows.append(ShapeCost(shape_devices(shape), opt.run.total_s, start))
        out[m] = rows
    return out


def plan_lower_bound(ctx: Context, state: PlanState) -> LowerBound:
    """`lower_bound` of the work at `state` on `ctx`'s pool."""
    return lower_bound(shape_costs(ctx, state), ctx.pool.count)
