"""Each request's predicted finish under a schedule, and per group of requests (a batch) the latest.

A pooled plan predicts one makespan; a user of the pool wants to know when *their* batch is done.
Computed only when asked (`Planner.finish_times`, `Planner.group_finish`, or `plan` for a problem
with `PlanningProblem.groups`), never while planning: the schedule is replayed with the planner's
exact context (`scheduler.replay.replay`, the replay that gave the schedule its stage times, so
its runs are the planning's own, read from the estimator's caches), every stage telling what it
ran (`StageRuns`), and each request's finish is read off the run of the stage it finishes in:

- a simulated run (`PlanRun.order` set; dependent work: `scheduler.pipeline.Placed`): the
  simulator's own finish time of that request, on the planning clock (engine ready + run time);
- an extrapolated run (`scheduler.extrapolation`: a large workload read off a fitted line, no
  per-request order): *approximated* by the request's position in its replica's queue (the
  round-robin or contiguous split of the rid order the estimator assumes, `split_replicas`): the
  k-th of a replica's requests finishes when the fraction k / n of the fullest replica's n requests
  has finished on the run's fitted finish curve. A replica is FCFS, so requests finish roughly in
  queue order; the curve's ramp-up and drain shape the times. Which requests a stage finishes is
  the estimator's own cut (the first requests of each replica's queue, as many as the fitted line
  finishes, `Estimator._left`), their times clipped into the stage.

A request's time is the one of the last stage that ran it, within [engine ready, stage end]; times
are never past the replay's end (the schedule's makespan). Pure: no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Mapping

import numpy as np

from scheduler.dag import split_replicas
from scheduler.estimator import Estimator, PlanRun, Workload
from scheduler.replay import replay
from scheduler.stages import EPS, Context, PlanState, StageRuns
from scheduler.types import ExecPlan, Schedule

FinishTimes = dict[str, dict[int, float]]  # model -> rid -> predicted finish (s from the plan start)


@dataclass
class CompletedSchedule(Schedule):
    """A `Schedule` with, per group of requests (`PlanningProblem.groups`), when its last request
    is predicted to finish (seconds from the plan's start; a group with no request left is
    absent), and the least makespan any schedule of the work could have (`scheduler.bounds`;
    None: not asked, `PlanningProblem.lower_bound`)."""

    group_finish_s: dict[Hashable, float] = field(default_factory=dict)
    lower_bound_s: float | None = None


def finish_times(ctx: Context, state: PlanState, schedule: Schedule) -> FinishTimes:
    """Per model, every request's predicted finish under `schedule` planned from `state` (the
    planner's initial state; `ctx`: its exact context, whose runs the schedule's times are)."""
    out: FinishTimes = {m: {} for m in state.work}
    end = replay(ctx, state, schedule, observe=lambda sr: _record(ctx.est, sr, out)).t
    for m, w in state.work.items():
        got = out[m]
        for r in w.requests:
            f = got.get(r.rid)
            got[r.rid] = end if f is None else min(f, end)
    return out


def group_finish(finish: FinishTimes,
                 groups: Mapping[str, Mapping[int, Hashable]]) -> dict[Hashable, float]:
    """The latest finish of each group's requests (`groups`: model -> rid -> group; requests
    without a group are left out)."""
    out: dict[Hashable, float] = {}
    for m, times in finish.items():
        of = groups.get(m)
        if not of:
            continue
        for rid, f in times.items():
            g = of.get(rid)
            if g is not None and (g not in out or f > out[g]):
                out[g] = f
    return out


def _record(est: Estimator, sr: StageRuns, out: FinishTimes) -> None:
    """The requests `sr`'s stage finishes, with their times, into `out` (a later stage's time of a
    request overwrites an earlier one: the stage cut left it to that stage)."""
    st, t0 = sr.stage, sr.before.t
    end = st.end_s
    lim = end * (1 + EPS) + EPS
    for p in st.plans:
        m = p.model
        rec = out.setdefault(m, {})
        done = m in st.finished
        if sr.placed:
            pl = sr.placed.get(m)
            if pl is None:
                continue
            for rid in pl.arrival:
                f = pl.finish_s(rid)
                if done or f <= lim:
                    rec[rid] = min(f, end)
            continue
        ready = t0 + sr.warm.get(m, 0.0)
        if ready >= end and not done:
            continue  # still starting when the stage ended
        work = sr.before.work[m]
        rids, offsets, approx = _run_times(est, p, work, sr.kept.get(m, False))
        times = np.minimum(np.maximum(ready + offsets, ready), end)
        if not approx:
            keep = np.ones(len(rids), bool) if done else ready + offsets <= lim
            rec.update(zip(rids[keep].tolist(), times[keep].tolist()))
            continue
        # extrapolated: the stage finishes what the estimator's cut says (`Estimator._left`)
        after = sr.after.work.get(m)
        left = set() if done or after is None else {r.rid for r in after.requests}
        here = {r.rid for r in work.requests}
        for rid, f in zip(rids.tolist(), times.tolist()):
            if rid in here and rid not in left:
                rec[rid] = f


def _run_times(est: Estimator, plan: ExecPlan, work: Workload, kept: bool
               ) -> tuple[np.ndarray, np.ndarray, bool]:
    """(rids, finish after the engine is ready, estimated by queue position?) of the requests the
    stage's run of `work` has, as `Estimator.run` runs them in the exact view: a root workload's
    own run; an engine kept on its shape continues its root's run (times from the position on);
    a restarted one runs the requests left."""
    name = est.variant(plan.model, plan.threads)
    src, shift = work, 0.0
    if work.pos is not None:
        pos = work.pos
        if kept and (plan.tp, plan.dp) == (pos.tp, pos.dp):
            src, shift = pos.root, pos.t_s
        else:
            src = est.materialize(work)
    run = est.run(name, plan.tp, plan.dp, src)
    rids = src.tokens[:, 0]
    if run.order is not None:
        fin = run.finish_sorted
        keep = fin > shift * (1 + 1e-12) if shift > 0 else np.ones(len(fin), bool)
        return rids[run.order[keep]], fin[keep] - shift, False
    return rids, queue_estimate(src, plan.dp, run) - shift, True


def queue_estimate(work: Workload, dp: int, run: PlanRun) -> np.ndarray:
    """Per request of `work` (in its order), when an extrapolated `run` on dp replicas finishes it:
    its position k (1-based) in its replica's queue, as the fraction k / n of the fullest replica's
    n requests, read off the run's finish curve (see the module docstring)."""
    curve = run.finish_sorted
    out = np.full(len(work), run.total_s, dtype=float)
    if not len(curve):
        return out
    parts = split_replicas(work.requests, dp, None)
    n = max((len(part) for part, _ in parts), default=0)
    grid = np.arange(1, len(curve) + 1, dtype=float) / len(curve)
    for part, idx in parts:
        if len(part):
            q = np.arange(1, len(part) + 1, dtype=float) / n
            out[np.asarray(idx, dtype=np.int64)] = np.interp(q, grid, curve)
    return np.minimum(out, run.total_s)
