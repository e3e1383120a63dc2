"""Replaying a schedule: its stages run again with another estimator (`evaluate`: the exact one)
or on another draw of the work (`replay`: `scheduler.workloads`, `scheduler.completion`); stage k
runs its plans until the models it was planned to finish are done (`stages.run_stage`)."""

from __future__ import annotations

import dataclasses

from scheduler.estimator import Workload
from scheduler.placement import place
from scheduler import spares as spare_pool
from scheduler.stages import Context, Observer, PlanState, run_stage
from scheduler.types import ExecPlan, Schedule, Stage


def evaluate(ctx: Context, state: PlanState, schedule: Schedule) -> Schedule:
    """`schedule`'s stages re-run with `ctx`'s estimator (`replay`), with their times recomputed:
    the planner chooses stages with cheap estimates and reports what the exact ones predict."""
    stages: list[Stage] = []
    state = replay(ctx, state, schedule, stages)
    return Schedule(schedule.strategy, stages, state.t, origin=schedule.origin)


def replay(ctx: Context, state: PlanState, schedule: Schedule,
           stages: list[Stage] | None = None, observe: Observer | None = None) -> PlanState:
    """`schedule`'s stages executed on another workload draw (the state after them; its `t` is the
    makespan; the stages run are appended to `stages`): stage k runs its plans until
    the models it was planned to finish are done. Models left over (none, when every model is planned
    to finish somewhere) run one after another on their last plan. With dependent work, a stage
    whose models all wait for work not done yet on this draw is skipped (it could not progress).
    `observe`: told what each stage ran (`run_stage`)."""
    if any(st.level is not None for st in schedule.stages):
        return _replay_levels(ctx, state, schedule, stages, observe)
    last: dict[str, ExecPlan] = {}
    for st in schedule.stages:
        for p in st.plans:
            last[p.model] = p
        if not any(p.model in state.work for p in st.plans):
            continue
        if ctx.dag is not None and not any(ctx.waiting(state).released.get(p.model, 0.0) > 0
                                           for p in st.plans):
            continue  # on this draw, all its models still wait for work of later stages
        stage, state = run_stage(ctx, state, st.plans, set(st.finished), observe)
        if stages is not None:
            stages.append(stage)
    while state.work:
        m = ctx.first_movable(state)
        plan = last.get(m) or place([ctx.best(state, m).shape], ctx.pool, state.preferred())[0]
        stage, state = run_stage(ctx, state, [plan], observe=observe)
        if stages is not None:
            stages.append(stage)
    return state


def _replay_levels(ctx: Context, state: PlanState, schedule: Schedule,
                   stages: list[Stage] | None, observe: Observer | None = None) -> PlanState:
    """A `level-by-level` schedule: each level's stages replayed on that level's requests alone,
    from when the previous level ended, with the engines of the previous level's last stage still
    running (warm; the first level: those running now) and every spare ready again (as `Planner`
    plans the levels)."""
    flat = dataclasses.replace(ctx, dag=None)  # a level's requests wait for nothing
    jobs = (ctx.dag.split_levels({m: w.requests for m, w in state.work.items()})
            if ctx.dag is not None else [{m: list(w.requests) for m, w in state.work.items()}])
    t = state.t
    warm = state.running
    for lv, job in enumerate(jobs):
        work = {m: w for m, w in ((m, Workload.of(r)) for m, r in sorted(job.items())) if len(w)}
        first = lv == 0
        sub = PlanState(t, work, {m: p for m, p in warm.items() if m in work},
                        {}, state.spares if first else spare_pool.refilled(state.spares))
        mine = Schedule(schedule.strategy, [dataclasses.replace(st, level=None)
                                            for st in schedule.stages if st.level == lv], 0.0)
        if mine.stages:
            warm = {p.model: p for p in mine.stages[-1].plans}
        n = len(stages) if stages is not None else 0
        t = replay(flat, sub, mine, stages, observe).t
        for st in (stages or [])[n:]:
            st.level = lv
    return PlanState(t, {}, {}, {}, state.spares)
