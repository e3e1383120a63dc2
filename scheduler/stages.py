"""Stage mechanics shared by every strategy: the planning state, running one stage, per-model options.

A strategy is a *chooser*: given the state (time, remaining work, engines up) it returns the shapes
(model, tp, dp) to run next. `run_policy` places them on devices, runs the stage until its first
model finishes (or until named models finish, when replaying a schedule), charges restarts and
repeats until every model is done. All strategies thus share one cost model and one output format.

Restart charging: an engine whose plan (tp, dp, devices) is unchanged keeps running and pays only
what is left of its start-up; a new or changed plan pays the full load time, and its in-flight
requests are re-prefilled with prompt + generated tokens (the simulator does that for generated > 0).

Start contention: engines started at the same time compete (on CPU for the very cores they will
run on), so each of n engines starting together pays `load × pool.start_factor(n)`
(`DevicePool.start_contention`). In a stage, n counts every engine (re)started in it, each DP
replica being one engine, plus the kept engines still warming up from an earlier stage (their own
remaining start-up is left as it was charged). An option (`Context.option`), priced alone, counts
its own replicas; a candidate group re-prices its options' starts with the group's count
(`Option.in_group`, used by `scheduler.search`), and `run_stage` charges the whole stage.

Stops and sleeps (`scheduler.stops`): the engines a stage replaces are stopped, or put to sleep
where engines sleep, and starts wait for the stops.

Spare engine processes (`runtime.engines.spares`, CPU; `scheduler.spares`): each engine a stage starts
takes a ready spare in plan order, and one that finds none pays `Context.no_spare_s` more; the
replacements import on the stage's idle cores once their engines are up. `PlanState.spares` is
None where the pool keeps no spares (every start costs its load time).

Dependent requests (`Context.dag`, `scheduler.dag`): a stage is simulated with every request's
arrival (`scheduler.pipeline`); it ends when its first model finishes, where a model with requests
held back (they wait for a model outside the stage) cannot finish, so it never ends one. Should no
model of the stage be able to finish (a cycle of the model graph), the first to run out of released
work ends it, so every stage makes progress. A `level-by-level` schedule is replayed level by level
(`Stage.level`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from scheduler.dag import Dag, Waiting
from scheduler.estimator import Estimator, PlanRun, Workload
from scheduler.pipeline import Placed, left, simulate_stage
from scheduler.placement import (Shape, make_shape, max_replicas, place, shape_devices,
                                 thread_counts, tp_degrees, unpack)
from scheduler import spares as spare_pool
from scheduler.growth import Growth, grow, grows, grows_into
from scheduler.stops import WAKE_S, put_to_sleep, stopped_by
from scheduler.types import DevicePool, ExecPlan, Schedule, Stage

EPS = 1e-9


class InfeasibleError(ValueError):
    """A model has no plan that fits the devices (memory, heads, topology)."""


@dataclass
class PlanState:
    """Where a (partial) schedule stands: `work` holds unfinished models only."""

    t: float
    work: dict[str, Workload]
    running: dict[str, ExecPlan] = field(default_factory=dict)
    warmup: dict[str, float] = field(default_factory=dict)  # start-up time still owed by engines
    spares: tuple[spare_pool.SpareSlot, ...] | None = None  # spare engine processes (None: the pool has none)
    # dependent work: the last stage's run of each of its models (a kept engine may continue its
    # own; they also say when each request was admitted and finished)
    timed: dict[str, Placed] = field(default_factory=dict)
    # engines up whose model has no work left (kept warm; stopped when a start needs their devices)
    idle: dict[str, ExecPlan] = field(default_factory=dict)
    # engines asleep (CPU: frozen, `runtime.executor.slots`): a stage that runs the same plan (tp,
    # dp, threads, devices) wakes them in `WAKE_S` instead of starting them; they hold no devices
    asleep: dict[str, ExecPlan] = field(default_factory=dict)
    # the memory engines put to sleep may still take (bytes): an engine a stage replaces sleeps
    # instead of stopping while it fits (`put_to_sleep`); None: every engine replaced is stopped
    sleep_room: float | None = None
    _waiting: Waiting | None = field(default=None, repr=False, compare=False)

    def preferred(self) -> dict[str, ExecPlan]:
        """The plans whose devices a placement keeps for the same shape: the engines running and
        those asleep (woken where they are instead of started)."""
        return {**self.asleep, **self.running}

    def wakes(self, plan: ExecPlan) -> bool:
        """Whether `plan` wakes engines asleep (each replica one) instead of starting them."""
        return plan.within(self.asleep.get(plan.model))


@dataclass(frozen=True)
class StageRuns:
    """What `run_stage` ran, for an observer (`scheduler.completion`): the stage, the states before
    and after it, each model's run (dependent work: `placed` instead), how long after the stage
    start each engine was ready, and whether it was kept from the previous stage."""

    stage: Stage
    before: PlanState
    after: PlanState
    runs: dict[str, PlanRun]
    placed: dict[str, Placed]
    warm: dict[str, float]
    kept: dict[str, bool]


Observer = Callable[[StageRuns], None]


@dataclass(frozen=True)
class Option:
    """One way to run a model in the next stage, with its predicted cost from now."""

    shape: Shape
    warm_s: float  # load time charged before the engine serves (0 if kept and warm)
    run: PlanRun
    starting: int = 0  # engines of this option starting (or still warming up) in the stage
    load_s: float = 0.0  # alone start time of a (re)started engine; 0 when kept
    no_spare_s: float = 0.0  # added to the start: too few spares ready for its replicas
    stop_s: float = 0.0  # added to the start: the model's running engine stops first (reshaped)

    def in_group(self, starting: int, pool: DevicePool) -> "Option":
        """This option when `starting` engines in all start with it (its warm-up re-priced)."""
        if self.load_s <= 0:
            return self
        return dataclasses.replace(
            self, warm_s=self.load_s * pool.start_factor(starting) + self.no_spare_s + self.stop_s)

    @property
    def devices(self) -> int:
        return shape_devices(self.shape)

    @property
    def finish_s(self) -> float:
        return self.warm_s + self.run.total_s

    def work_by(self, t: float) -> float:
        return self.run.work_done(t - self.warm_s)


@dataclass
class Context:
    """What every chooser can use: the estimator, the pool and the model order (largest first)."""

    est: Estimator
    pool: DevicePool
    order: list[str]
    _shapes: dict[str, list[Shape]] = field(default_factory=dict)
    no_spare_s: float = 0.0  # what a start costs more without a ready spare (`PlanState.spares`)
    dag: Dag | None = None  # the requests' dependencies; None: none (and no arrival times)
    stop_s: float = 0.0  # what a start costs more while engines stop (the runtime waits for them)
    # model -> the memory one replica of its engines holds asleep (`PlanState.sleep_room`)
    engine_bytes: Mapping[str, float] = field(default_factory=dict)

    def sleep_bytes(self, plan: ExecPlan) -> float:
        return self.engine_bytes.get(plan.model, 0.0) * plan.dp

    def sleeps(self, state: PlanState, plan: ExecPlan) -> bool:
        """Whether the engines of `plan`, replaced now, would sleep (priced alone)."""
        return state.sleep_room is not None and self.sleep_bytes(plan) <= state.sleep_room

    def first_movable(self, state: PlanState) -> str:
        """The first model left in `order` that can run on its own: with dependent work, one with
        requests that wait for no other model (there is one: the requests form a DAG)."""
        todo = [m for m in self.order if m in state.work]
        if self.dag is None:
            return todo[0]
        released = self.waiting(state).released
        return next((m for m in todo if released.get(m, 0.0) > 0), todo[0])

    def waiting(self, state: PlanState) -> Waiting:
        """Who waits for whom at `state` (dependent work only; computed once per state)."""
        if state._waiting is None:
            state._waiting = self.dag.waiting({m: [r.rid for r in w.requests]
                                               for m, w in state.work.items()})
        return state._waiting

    def shapes(self, model: str) -> list[Shape]:
        """Feasible (model, tp, dp[, threads]): TP a power of two within a topology group, valid for
        the heads, weights + a max-length sequence of KV fit per rank, dp replicas fit the pool; on
        CPU pools also ranks on `threads` cores each (`thread_counts`; a replica: tp × threads)."""
        if model not in self._shapes:
            spec = self.est.models[model]
            out = [make_shape(model, tp, dp, th) for th in thread_counts(self.pool)
                   for tp in tp_degrees(self.pool)
                   if spec.valid_tp(tp) and self.est.fits(model, tp)
                   for dp in range(1, max_replicas(self.pool, tp * th) + 1)]
            if not out:
                raise InfeasibleError(f"model {model!r} fits no plan on {self.pool.count} "
                                      f"{self.pool.kind} device(s) (memory, heads or topology)")
            self._shapes[model] = out
        return self._shapes[model]

    def option(self, state: PlanState, shape: Shape) -> Option:
        m, tp, dp, th = unpack(shape)
        cur = state.running.get(m)
        # kept: the same shape, or fewer replicas of it (placed on its first replicas' devices)
        kept = cur is not None and cur.fits_in(tp, dp, th)
        run = self.est.run(self.est.variant(m, th), tp, dp, state.work[m], kept)
        if kept:
            warming = state.warmup.get(m, 0.0)
            return Option(shape, warming, run, dp if warming > 0 else 0)
        asleep = state.asleep.get(m)
        if asleep is not None and asleep.fits_in(tp, dp, th):
            return Option(shape, WAKE_S, run)  # placed where it sleeps (`PlanState.preferred`)
        if self.dag is None and grows(cur, tp, dp, th) and state.warmup.get(m, 0.0) <= 0:
            new = dp - cur.dp  # its running replicas serve on while these start
            extra = self.spare_charge(spare_pool.ready_count(state.spares), new)
            g = grow(self.est, self.est.variant(m, th), tp, cur.dp, dp, state.work[m],
                     self.start_s(m, tp, new, th) + extra)
            if g.tail is None:  # done before the new replicas are up
                return Option(shape, 0.0, g.head)
            return Option(shape, g.warm_s, g.tail, new,
                          self.est.load_time(self.est.variant(m, th), tp), extra)
        extra = self.spare_charge(spare_pool.ready_count(state.spares), dp)
        # priced alone: its own engine's stop (none when it goes to sleep: a freeze is at once)
        stop = self.stop_s if cur is not None and not self.sleeps(state, cur) else 0.0
        return Option(shape, self.start_s(m, tp, dp, th) + extra + stop, run, dp,
                      self.est.load_time(self.est.variant(m, th), tp), extra, stop)

    def spare_charge(self, spares: int | None, engines: int) -> float:
        """Extra start time of a model whose `engines` replicas start with `spares` ready (priced
        alone; `run_stage` hands the spares out over the whole stage)."""
        return self.no_spare_s if spares is not None and spares < engines else 0.0

    def start_s(self, model: str, tp: int, starting: int, threads: int = 1) -> float:
        """Start time of one (model, tp, threads) engine while `starting` engines (itself included)
        start: the shape's own (on CPU a rank on several cores starts slower than one on one)."""
        return (self.est.load_time(self.est.variant(model, threads), tp)
                * self.pool.start_factor(starting))

    def best_per_count(self, state: PlanState, model: str, max_devices: int | None = None) -> list[Option]:
        """Per device count, the option that finishes soonest (ties: smaller TP, fewer DP
        replicas, fewer threads), ascending count."""
        best: dict[int, Option] = {}
        for shape in self.shapes(model):
            n = shape_devices(shape)
            if max_devices is not None and n > max_devices:
                continue
            opt = self.option(state, shape)
            cur = best.get(n)
            if cur is None or (opt.finish_s, unpack(opt.shape)[1:]) < (cur.finish_s,
                                                                      unpack(cur.shape)[1:]):
                best[n] = opt
        return [best[n] for n in sorted(best)]

    def best(self, state: PlanState, model: str, max_devices: int | None = None) -> Option | None:
        opts = self.best_per_count(state, model, max_devices)
        return min(opts, key=lambda o: (o.finish_s, o.devices)) if opts else None


def initial_warmup(warmup: dict[str, float], running: dict[str, ExecPlan]) -> dict[str, float]:
    """The start-up still owed by the engines kept in a plan's initial state (those running now
    and not serving yet: `PlanningProblem.warmup`)."""
    return {m: max(0.0, w) for m, w in warmup.items() if m in running}


def run_stage(ctx: Context, state: PlanState, plans: Sequence[ExecPlan],
              finishers: set[str] | None = None,
              observe: Observer | None = None) -> tuple[Stage, PlanState]:
    """Run `plans` from state.t until the first model finishes (or, if `finishers` is given, until
    those of them still unfinished finish; models done earlier idle). Returns the stage and the state
    after it; `observe` (if any) is told what ran (`StageRuns`)."""
    est = ctx.est
    plans = [p for p in plans if p.model in state.work]
    restarts, warm, runs, kept = [], {}, {}, {}
    for p in plans:
        kept[p.model] = p.within(state.running.get(p.model))
    woken = {p.model for p in plans if not kept[p.model] and state.wakes(p)}
    # grown by replicas: the running ones serve on while the new ones start (`scheduler.growth`)
    old = {p.model: state.running[p.model] for p in plans
           if ctx.dag is None and not kept[p.model] and p.model not in woken
           and grows_into(state.running.get(p.model), p) and state.warmup.get(p.model, 0.0) <= 0}
    new = {p.model: p.dp - (old[p.model].dp if p.model in old else 0) for p in plans}
    # engines starting together: every replica (re)started now, plus kept ones still warming up
    starting = sum(new[p.model] for p in plans if not kept[p.model] and p.model not in woken
                   or state.warmup.get(p.model, 0.0) > 0)
    spares = state.spares
    stopped = stopped_by(state, plans, {m: k or m in old for m, k in kept.items()})
    slept, room = put_to_sleep(ctx, state, stopped)
    stop_s = ctx.stop_s if len(slept) < len(stopped) else 0.0  # starts wait for real stops only
    for p in plans:
        if kept[p.model]:
            warm[p.model] = state.warmup.get(p.model, 0.0)
        elif p.model in woken:  # woken once the engines it replaces are stopped
            warm[p.model] = WAKE_S + stop_s
            if room is not None:
                room += ctx.sleep_bytes(p)
        else:
            warm[p.model] = ctx.start_s(p.model, p.tp, starting, p.threads) + ctx.spare_charge(
                spare_pool.ready_count(spares), new[p.model]) + stop_s
            if spares is not None:
                spares = spare_pool.take(spares, new[p.model], warm[p.model], ctx.no_spare_s)
            restarts.append(p.model)
    placed: dict[str, Placed] = {}
    grown: dict[str, Growth] = {}
    if ctx.dag is None:
        finish = {}
        for p in plans:
            m, name = p.model, est.variant(p.model, p.threads)
            if m in old:
                grown[m] = grow(est, name, p.tp, old[m].dp, p.dp, state.work[m], warm[m])
                runs[m], finish[m] = grown[m].run, grown[m].finish_s
            else:
                runs[m] = est.run(name, p.tp, p.dp, state.work[m], kept[m])
                finish[m] = warm[m] + runs[m].total_s
        can_end = finish
    else:
        placed = simulate_stage(est, ctx.dag, state.t, state.work, plans, warm, kept, state.timed)
        finish = {m: pl.end_s - state.t for m, pl in placed.items()}
        can_end = {m: f for m, f in finish.items() if not placed[m].held}
    dur = _stage_end(finish, can_end, finishers)
    done = sorted(m for m in can_end if can_end[m] <= dur * (1 + EPS) + EPS)
    work = {m: w for m, w in state.work.items() if m not in done}
    warmup: dict[str, float] = {}
    for p in plans:
        m = p.model
        if m in done:
            continue
        ready_for = dur - warm[m]
        if m in grown:
            work[m] = grown[m].left(est, dur)
            if ready_for < 0:
                warmup[m] = -ready_for
        elif ready_for < 0:
            warmup[m] = -ready_for
        elif ctx.dag is None:
            work[m] = est.advance(est.variant(m, p.threads), p.tp, p.dp, state.work[m], ready_for,
                                  kept[m])
        else:
            work[m] = left(est, placed[m], state.work[m], state.t + dur)
            if not len(work[m]):  # finished within rounding of the stage end
                del work[m]
                done.append(m)
    if ctx.dag is not None and not done and sum(map(len, work.values())) >= sum(
            map(len, state.work.values())):
        raise RuntimeError("a stage of dependent work finished no request")  # never loop on it
    waits = ctx.waiting(state).up if ctx.dag is not None else {}
    stage = Stage(plans=list(plans), start_s=state.t, end_s=state.t + dur, finished=sorted(done),
                  predicted_finish_s={m: state.t + f for m, f in finish.items() if f < math.inf},
                  restarts=restarts,
                  waits_on={p.model: sorted(waits[p.model]) for p in plans if waits.get(p.model)})
    running = {p.model: p for p in plans if p.model not in done}
    if spares is not None:
        free = ctx.pool.count - sum(len(p.devices) for p in plans)
        spares = spare_pool.advance(spares, dur, max(0, free))
    gone = {e.model for e in stopped}
    idle = {m: e for m, e in state.idle.items() if m not in gone} | {
        p.model: p for p in plans if p.model in done}
    asleep = {m: e for m, e in state.asleep.items() if m not in woken and m not in running} | {
        e.model: e for e in slept if e.model in work and e.model not in running}
    after = PlanState(state.t + dur, work, running, warmup, spares, placed, idle=idle,
                      asleep=asleep, sleep_room=room)
    if observe is not None:
        observe(StageRuns(stage, state, after, runs, placed, warm, kept))
    return stage, after


def _stage_end(finish: dict[str, float], can_end: dict[str, float],
               finishers: set[str] | None) -> float:
    """The stage's length: its first model to finish among those that can (`can_end`), or, with
    `finishers`, the last of those named; when none can finish (dependent work), the first model to
    run out of released requests (`finish`)."""
    if can_end:
        targets = [m for m in can_end if finishers is None or m in finishers] or list(can_end)
        dur = (max if finishers is not None and any(m in finishers for m in can_end) else min)(
            can_end[m] for m in targets)
    else:
        dur = min(finish.values(), default=math.inf)
    if dur == math.inf:
        raise InfeasibleError("a stage whose models all wait for work outside it makes no progress")
    return dur


Chooser = Callable[[Context, PlanState], list[Shape]]


def run_policy(ctx: Context, state: PlanState, choose: Chooser, strategy: str) -> Schedule:
    """Repeat choose → place → run_stage until no work is left. With dependent work, a choice in
    which every model waits for one left out (possible in a cycle of the model graph) is replaced
    by the first model that can run on its own, on its fastest plan, so every stage progresses."""
    stages: list[Stage] = []
    while state.work:
        shapes = choose(ctx, state)
        if ctx.dag is not None and not any(ctx.waiting(state).released.get(s[0], 0.0) > 0
                                           for s in shapes):
            shapes = [ctx.best(state, ctx.first_movable(state), ctx.pool.count).shape]
        plans = place(shapes, ctx.pool, state.preferred())
        if not shapes or plans is None:
            raise InfeasibleError(f"{strategy}: chose an unplaceable stage {shapes}")
        stage, state = run_stage(ctx, state, plans)
        stages.append(stage)
    return Schedule(strategy=strategy, stages=stages, makespan_s=state.t)
