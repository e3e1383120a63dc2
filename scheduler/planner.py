"""The multi-LLM planner: `plan(problem, strategy) -> Schedule`.

The runtime calls `plan` at every event (batch added, engine finished, request finished, engine
died) with what is left to do and what is running; `samullm plan` calls it once per strategy.

Strategies (same cost model, same `Schedule` format; see `scheduler.baselines` for the competitors):
- `samullm`: the paper's greedy stage search (`scheduler.search`), improved in two ways:
  (1) it explores: the best `explore` first-stage groups are each completed greedily and the schedule
  with the smallest predicted makespan is kept (the paper's `max_group_seq_num`, applied at the
  root, where a wrong choice costs most);
  (2) it then also evaluates every baseline's schedule with the same cost model and returns the
  cheapest of all. So `samullm` is never predicted worse than the best baseline *by construction*:
  when a baseline wins, its stages are returned unchanged with `origin = "baseline:<name>"`; when the
  search wins, `origin = "search"`. Benchmarks report which one it was, so a speed-up over a
  baseline is never a hidden re-labelling of the search's own result.
- `sequential`, `even-split`, `per-model-best`, `muxserve-greedy`: see `scheduler.baselines`.
- `level-by-level`: dependent requests as users run them without this gateway: each topological
  level (`scheduler.dag`) as a pooled job of its own, planned by `samullm` on that level's requests
  alone, all its requests arriving at its start, which is when the previous level ended. The first
  level keeps the engines running now; a later one starts with the engines of the previous level's
  last stage (the gateway keeps an engine warm after its batch, `[devices] engine_linger_s`, far
  longer than a client takes to upload the next level). Its stages are the levels' stages in order (`Stage.level`). Without
  dependencies it is one pooled job: the search's schedule.

Dependent requests (`SimRequest.upstream`, `scheduler.dag`): prompts are resolved first (upstream
outputs of the same draw added); models are taken upstream first by every strategy; stages are
simulated with every request's arrival (`scheduler.pipeline`). Work without upstream requests or
arrival times takes the path it took before either existed.

Cost: every strategy chooses its stages with `Planner.ctx`, whose estimator simulates each (model,
tp, dp) once on the initial work and reads later stages off those runs (kept engines continue them
exactly; restarts are estimated, `scheduler.estimator`); every schedule returned is then re-run with
`Planner.exact_ctx`, which simulates the restarts, so the makespans reported are never the cheap
estimates.

Per request and per group (a batch of the pool): `Planner.finish_times` / `Planner.group_finish`
(`scheduler.completion`), computed only when asked; `plan` does it for a problem with `groups`.

Determinism: the search has no randomness (ties break on shapes and model names); `seed` is carried
for callers that sample output lengths (`scheduler.workloads`). Pure: the caller times the planning
(`Schedule.planning_time_s` is left at 0 here, since `scheduler/` never reads a clock).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Hashable, Mapping

from scheduler.bounds import LowerBound, plan_lower_bound
from scheduler.completion import CompletedSchedule, FinishTimes, finish_times, group_finish
from scheduler.baselines import PerModelBest, even_split, muxserve_greedy, sequential
from scheduler.dag import Dag, dependent, resolve_prompts
from scheduler.estimator import Estimator, Workload
from scheduler.latency import LatencyModel
from scheduler.search import greedy_chooser, rank_groups
from scheduler.spares import slots_of
from scheduler.replay import evaluate
from scheduler.stages import (Context, InfeasibleError, PlanState, initial_warmup, run_policy,
                              run_stage)
from scheduler.placement import place
from scheduler.types import DevicePool, ExecPlan, ModelSpec, Schedule, SimRequest

STRATEGIES = ("samullm", "sequential", "even-split", "per-model-best", "muxserve-greedy",
              "level-by-level")
BASELINES = STRATEGIES[1:]

__all__ = ["PlanningProblem", "plan", "plan_all", "STRATEGIES", "BASELINES", "InfeasibleError",
           "Planner", "CompletedSchedule"]


@dataclass
class PlanningProblem:
    """Everything the planner needs; nothing in here is mutated.

    models: every model that may appear in `work` (name -> spec).
    work: remaining requests per model; `output_len` is the (sampled or known) target and
        `generated` the tokens already produced (a restarted engine re-prefills them). rids are
        unique per model; `upstream` (model, rid) pairs name requests of this work a request waits
        for, `arrival_s` its earliest start (seconds from now; see `SimRequest`).
    pool: the devices; TP groups stay inside `pool.topology_groups()`.
    latency: (spec, tp) -> per-iteration latency model, whose `load_time_s` is the engine start cost.
    kv_bytes_per_rank: (spec, tp) -> KV memory one rank of such an engine gets (≤ 0 or less than one
        max-length sequence: the plan is infeasible, e.g. the weights do not fit).
    running: engines up now (model -> plan with devices); a plan kept unchanged pays no load time
        but what `warmup` says it still owes (an engine started and not serving yet).
    top_k: candidate stage groups kept per model expansion (the paper's 20).
    seed: carried for length sampling; the search itself is deterministic.
    explore: first-stage groups completed into full schedules by `samullm` (1 = pure greedy).
    compare_baselines: `samullm` also returns a baseline's schedule when it is predicted faster.
    threads_latency: (spec, tp, threads) -> latency of an engine whose ranks run on `threads` CPU
        cores each (shapes offered when `pool.max_threads` > 1); None: the threads = 1 latency with
        the assumed speed-up of `scheduler.latency.assumed_threads_latency`.
    spares: per spare engine process of the pool (`runtime.engines.spares`), the CPU seconds of import it
        has left (0: ready); each engine started takes a ready one, a start without one costs
        `no_spare_s` more than its load time, and a spare taken is re-imported at that cost on idle
        cores (`scheduler.spares`). None: the pool keeps no spares.
    groups: model -> rid -> group (the runtime: the request's batch id). Set, `plan` returns a
        `CompletedSchedule`: the schedule with each group's predicted completion (the latest finish
        of its requests, `scheduler.completion`); None (the default): not computed.
    lower_bound: `plan` returns a `CompletedSchedule` whose `lower_bound_s` is the least makespan
        any schedule of the work can have under this cost model (`Planner.lower_bound`).
    """

    models: dict[str, ModelSpec]
    work: dict[str, list[SimRequest]]
    pool: DevicePool
    latency: Callable[[ModelSpec, int], LatencyModel]
    kv_bytes_per_rank: Callable[[ModelSpec, int], int]
    running: dict[str, ExecPlan] = field(default_factory=dict)
    top_k: int = 20
    seed: int = 0
    explore: int = 3
    compare_baselines: bool = True
    threads_latency: Callable[[ModelSpec, int, int], LatencyModel] | None = None
    spares: tuple[float, ...] | None = None
    no_spare_s: float = 0.0
    # running engines still starting: model -> seconds until it serves (a re-plan during a start
    # must not take an engine that is 2 s into a 20 s start for one that serves now)
    warmup: dict[str, float] = field(default_factory=dict)
    groups: Mapping[str, Mapping[int, Hashable]] | None = None
    lower_bound: bool = False
    # engines up now whose model has no work here (kept warm; a start on their devices stops them)
    idle: dict[str, ExecPlan] = field(default_factory=dict)
    stop_s: float = 0.0  # an engine stop: starts wait for the stops of their stage (`stages`)
    # engines asleep (CPU: frozen, their memory kept): a stage with the same plan wakes them in
    # `stops.WAKE_S` instead of paying a start (`PlanState.asleep`); they hold no devices
    asleep: dict[str, ExecPlan] = field(default_factory=dict)
    # the memory engines put to sleep may still take (bytes), and per model what one replica of
    # its engines holds asleep: an engine a stage replaces sleeps while it fits, at no stop
    # (`stops.put_to_sleep`); None: engines replaced are stopped (GPU, Ray)
    sleep_room: float | None = None
    engine_bytes: dict[str, float] = field(default_factory=dict)
    # `samullm` replaces a running engine (stops or reshapes it) only for a schedule predicted
    # shorter than the best that keeps them all by more than this (seconds + share of it): the
    # cost model's error is larger for a shape not served yet, and a start thrown away is lost
    replace_margin_s: float = 1.0
    replace_margin: float = 0.03
    # `samullm`'s second objective, the batches' own (`groups`): among the schedules it found whose
    # makespan is within this share of the one it chose, the one whose groups complete soonest in
    # sum (0: the makespan alone decides; see `Planner._by_batches`)
    batch_slack: float = 0.0


class Planner:
    """One problem, one estimator cache shared by every strategy asked of it."""

    def __init__(self, problem: PlanningProblem) -> None:
        self.problem = problem
        # dependent requests' prompts hold their upstream requests' sampled outputs
        self.work = resolve_prompts(problem.work, problem.models)
        # a copy of the models: the estimator registers thread variants in it (`Estimator.variant`)
        self.est = Estimator(dict(problem.models), problem.latency, problem.kv_bytes_per_rank,
                             problem.threads_latency)
        # largest first: the paper's expansion order, and the baselines' priority
        order = sorted(problem.models, key=lambda m: (-problem.models[m].param_count, m))
        dag = Dag(self.work, order) if dependent(self.work) else None
        self.dag = dag if dag is not None and dag.active else None
        if self.dag is not None:
            order = self.dag.order  # upstream models first, ties largest first
            self.est.chains = self.dag.same_model
        self.ctx = Context(self.est, problem.pool, order, no_spare_s=problem.no_spare_s,
                           dag=self.dag, stop_s=problem.stop_s,
                           engine_bytes=problem.engine_bytes)
        # stages are chosen with `ctx` (restarts estimated from the root runs) and every schedule
        # returned is re-run with `exact_ctx` (restarts simulated), which gives its stage times
        self.exact_ctx = Context(self.est.exact(), problem.pool, order, self.ctx._shapes,
                                 problem.no_spare_s, self.dag, problem.stop_s,
                                 problem.engine_bytes)
        self._done: dict[str, Schedule] = {}
        self._initial: PlanState | None = None
        # the search's best schedule that keeps every running engine (`_steady`), once searched
        self._keeping: Schedule | None = None
        # the search's own schedule (before the comparison with the baselines), once planned
        self.search_schedule: Schedule | None = None
        # every schedule `samullm` evaluated exactly: the search's, the baselines' (`_by_batches`)
        self._candidates: list[Schedule] = []
        self._finish: dict[int, tuple[Schedule, FinishTimes]] = {}  # by id(schedule)

    def initial_state(self) -> PlanState:
        if self._initial is None:
            self._initial = self._make_initial_state()
        return self._initial

    def _make_initial_state(self) -> PlanState:
        work = {m: Workload.of(reqs) for m, reqs in sorted(self.work.items())}
        unknown = sorted(set(work) - set(self.problem.models))
        if unknown:
            raise KeyError(f"work for unknown model(s): {', '.join(unknown)}")
        state = self.state_for(work)
        for m in state.work:
            self.ctx.shapes(m)  # raises InfeasibleError early, naming the model
        return state

    def state_for(self, work: Mapping[str, Workload]) -> PlanState:
        """The state at the plan's start with `work` left (the problem's, or another draw of it):
        the problem's engines up, running for the models with work and idle for the others."""
        work = {m: w for m, w in work.items() if len(w)}
        p = self.problem
        running = {m: e for m, e in p.running.items() if m in work}
        idle = {m: e for m, e in p.running.items() if m not in work} | {
            m: e for m, e in p.idle.items() if m not in work}
        return PlanState(0.0, work, running, initial_warmup(p.warmup, running),
                         slots_of(p.spares), idle=idle,
                         asleep={m: e for m, e in p.asleep.items() if m in work and m not in running},
                         sleep_room=p.sleep_room)

    def plan(self, strategy: str = "samullm") -> Schedule:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
        if strategy not in self._done:
            self._done[strategy] = self._plan(strategy)
        return self._done[strategy]

    def _plan(self, strategy: str) -> Schedule:
        state = self.initial_state()
        policies = {"sequential": sequential, "even-split": even_split,
                    "per-model-best": PerModelBest(), "muxserve-greedy": muxserve_greedy}
        if strategy in policies:
            return evaluate(self.exact_ctx, state, run_policy(self.ctx, state, policies[strategy],
                                                              strategy))
        if strategy == "level-by-level":
            return self._level_by_level()
        best = self._searched()
        if self.problem.compare_baselines:
            for name in BASELINES:
                other = self.plan(name)
                mine = Schedule("samullm", other.stages, other.makespan_s, origin=f"baseline:{name}")
                if other.makespan_s < best.makespan_s * (1 - 1e-9):
                    best = mine
                self._consider_keeping(mine)
                self._candidates.append(mine)
        return self._by_batches(self._steady(best))

    def _keeps(self, first: list[ExecPlan]) -> bool:
        """Whether a first stage of `first` keeps every engine running now (none stopped or
        reshaped; one still starting goes on starting)."""
        return all(any(p.same_shape(e) for p in first)
                   for e in self.initial_state().running.values())

    def _keeps_all(self, schedule: Schedule) -> bool:
        """Whether `schedule`'s first stage keeps every engine running now (`_keeps`)."""
        return self._keeps(schedule.stages[0].plans if schedule.stages else [])

    def _consider_keeping(self, schedule: Schedule) -> None:
        """Remember `schedule` as `_keeping` if it keeps every running engine and is the shortest
        such so far."""
        if self._keeps_all(schedule) and (self._keeping is None or schedule.makespan_s
                                   < self._keeping.makespan_s * (1 - 1e-9)):
            self._keeping = schedule

    def _steady(self, best: Schedule) -> Schedule:
        """`best`, unless it replaces a running engine and `_keeping` (the best schedule that
        keeps them all) is within the problem's replace margin of it."""
        keeping = self._keeping
        if keeping is None or self._keeps_all(best):
            return best
        p = self.problem
        margin = p.replace_margin_s + p.replace_margin * keeping.makespan_s
        return keeping if keeping.makespan_s <= best.makespan_s + margin else best

    def _by_batches(self, best: Schedule) -> Schedule:
        """The batches' objective after the pool's: of the schedules evaluated (`_candidates`)
        whose makespan is within `batch_slack` of `best`'s, the one with the least sum of its
        groups' predicted completions (`best` on ties). The pool's makespan is what makes pooling
        pay, so it comes first; but where several schedules finish the pool alike, the order of
        their stages decides when each batch is done: a 5-request batch's model run before a
        big batch's rather than after it costs the pool nothing. A candidate that stops or
        reshapes a running engine is not taken over one that keeps them all (`_steady`)."""
        p = self.problem
        if p.batch_slack <= 0 or not p.groups or len(
                {g for of in p.groups.values() for g in of.values()}) < 2:
            return best
        keeps = self._keeps_all(best)
        limit = best.makespan_s * (1 + p.batch_slack)
        near = [c for c in self._candidates if c is not best and c.makespan_s <= limit
                and (not keeps or self._keeps_all(c))]
        if not near:
            return best
        score = lambda s: sum(self.group_finish(s, p.groups).values())  # noqa: E731
        choice, least = best, score(best)
        for cand in near:
            got = score(cand)
            if got < least * (1 - 1e-9):
                choice, least = cand, got
        return choice

    def finish_times(self, schedule: Schedule) -> FinishTimes:
        """Per model, each request's (rid) predicted finish under `schedule`, one of this planner's
        (seconds from the plan's start; `scheduler.completion`). Replays the schedule once (then
        cached): call it only when the answer is wanted."""
        got = self._finish.get(id(schedule))
        if got is None or got[0] is not schedule:
            got = self._finish[id(schedule)] = (
                schedule, finish_times(self.exact_ctx, self.initial_state(), schedule))
        return got[1]

    def group_finish(self, schedule: Schedule,
                     groups: Mapping[str, Mapping[int, Hashable]]) -> dict[Hashable, float]:
        """Per group (`PlanningProblem.groups`), when its last request is predicted to finish."""
        return group_finish(self.finish_times(schedule), groups)

    def lower_bound(self) -> LowerBound:
        """No schedule of this problem is predicted to end before it (`scheduler.bounds`): read
        off the runs the search ranks its options with, on the initial state."""
        return plan_lower_bound(self.ctx, self.initial_state())

    def _searched(self) -> Schedule:
        if self.search_schedule is None:
            self.search_schedule = self._search(self.initial_state())
        return self.search_schedule

    def _level_by_level(self) -> Schedule:
        """Each topological level planned by `samullm` as a job of its own (see the module
        docstring); without dependencies, the one job's search."""
        if self.dag is None or not self.dag.up:
            s = self._searched()
            return Schedule("level-by-level", s.stages, s.makespan_s)
        p, stages, t = self.problem, [], 0.0
        warm = p.running
        for lv, work in enumerate(self.dag.split_levels(self.work)):
            first = lv == 0
            job = dataclasses.replace(
                p, work=work, running=warm, idle=p.idle if first else {},  # split by `state_for`
                warmup=p.warmup if first else {},
                # every spare ready again (`scheduler.spares.refilled`, as the replay assumes)
                spares=p.spares if first or p.spares is None else tuple(0.0 for _ in p.spares))
            s = Planner(job).plan("samullm")
            stages += [dataclasses.replace(
                st, start_s=t + st.start_s, end_s=t + st.end_s, level=lv,
                predicted_finish_s={m: t + f for m, f in st.predicted_finish_s.items()})
                for st in s.stages]
            t += s.makespan_s
            warm = {pl.model: pl for pl in s.stages[-1].plans} if s.stages else {}
        return Schedule("level-by-level", stages, t)

    def _search(self, state: PlanState) -> Schedule:
        """Greedy search with exploration of the first stage: the top 2·`explore` first-stage groups
        are completed greedily with the cheap restart estimates, and the `explore` schedules
        predicted shortest are re-run with simulated restarts (`evaluate`); the shortest wins.
        Completing is cheap (runs are read off cached root runs); re-running costs simulations."""
        choose = greedy_chooser(self.problem.top_k)
        if not state.work:
            return Schedule("samullm", [], 0.0, origin="search")
        explore = max(1, self.problem.explore)

        def draft(plans: list[ExecPlan]) -> Schedule:
            first, after = run_stage(self.ctx, state, plans)
            rest = run_policy(self.ctx, after, choose, "samullm")
            return Schedule("samullm", [first] + rest.stages, rest.makespan_s, origin="search")

        ranked = [(g, place(g.shapes, self.ctx.pool, state.preferred()))
                  for g in rank_groups(self.ctx, state, self.problem.top_k)]
        ranked = [(g, plans) for g, plans in ranked if plans is not None]
        drafts = [draft(plans) for _, plans in ranked[:2 * explore]]
        best: Schedule | None = None
        for cand in sorted(drafts, key=lambda d: d.makespan_s)[:explore]:  # stable: rank order
            cand = evaluate(self.exact_ctx, state, cand)
            self._candidates.append(cand)
            if best is None or cand.makespan_s < best.makespan_s * (1 - 1e-9):
                best = cand
            self._consider_keeping(cand)
        if best is None:
            raise InfeasibleError("samullm: no placeable first stage")
        if self._keeping is None and not self._keeps_all(best):
            # the best-ranked first stage that keeps every running engine, completed greedily
            keep = next((plans for _, plans in ranked if self._keeps(plans)), None)
            if keep is not None:
                self._keeping = evaluate(self.exact_ctx, state, draft(keep))
        return best


def plan(problem: PlanningProblem, strategy: str = "samullm") -> Schedule:
    """Plan `problem` with `strategy` (one of STRATEGIES). Raises InfeasibleError if some model with
    work fits no plan on the pool, ValueError for an unknown strategy or for requests that wait for
    each other (a cycle of `upstream`). With `problem.groups` or `problem.lower_bound`: a
    `CompletedSchedule` (each group's completion, the makespan's lower bound)."""
    planner = Planner(problem)
    schedule = planner.plan(strategy)
    if problem.groups is None and not problem.lower_bound:
        return schedule
    return CompletedSchedule(
        schedule.strategy, schedule.stages, schedule.makespan_s, schedule.planning_time_s,
        schedule.origin,
        {} if problem.groups is None else planner.group_finish(schedule, problem.groups),
        planner.lower_bound().value_s if problem.lower_bound else None)


def plan_all(problem: PlanningProblem, strategies: tuple[str, ...] = STRATEGIES) -> dict[str, Schedule]:
    """Several strategies on one problem, sharing the simulation cache."""
    planner = Planner(problem)
    return {s: planner.plan(s) for s in strategies}
