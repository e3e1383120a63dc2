"""The SamuLLM greedy stage search (PAPER.md §3), as a chooser that ranks candidate stage groups.

At each stage, for the state at hand:
1. per unfinished model, per device count, the fastest plan (TP × DP) by simulated time, including
   the load time if the plan differs from the engine running now (`Context.best_per_count`);
2. groups (one option per model, or the model left out) are built model by model, largest first,
   keeping the `top_k` best partial groups by throughput after each model;
3. throughput = useful FLOPs of the tokens produced by the stage end (the group's earliest model
   finish) / stage duration; the paper keeps the top_k partial groups by throughput. We keep those
   *and* the top_k by an estimated makespan (`Outlook`: stage time + max(device-seconds left /
   devices, longest single-model finish left)), because throughput alone happily defers models to
   later stages where they run alone after a restart (it does not see the work a group leaves out);
4. complete groups that leave devices idle while a left-out model could still use them are dropped;
   dominated groups (same shapes, or a subset of an all-device group with higher throughput) too;
5. the survivors are returned best first by estimated makespan (then throughput); `greedy` recurses
   on the best (via `run_policy`).

Dependent requests (`Context.dag`): models are expanded upstream first (`Dag.order`), and each
group's options are scored for what the group lets them do (`Flow`): a model waiting for a model
left out of the group works only on its released requests and cannot end the stage (a group of such
models alone makes no progress and is never chosen); a model whose upstream models are in the group
is pipelined behind them: it cannot finish before they do plus the time its last released requests
take. A downstream model is thus placed in its upstream's stage or in a later one, whichever the
ranking prefers; the stage itself is then simulated with every request's arrival
(`scheduler.pipeline`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from scheduler.dag import Waiting
from scheduler.placement import Shape, place, unpack
from scheduler.stages import Context, Option, PlanState
from scheduler.types import DevicePool

EPS = 1e-12


@dataclass(frozen=True)
class Group:
    options: tuple[Option, ...]
    devices: int
    stage_s: float  # earliest finish among the options (inf for the empty group)
    throughput: float
    est_makespan_s: float = float("inf")  # stage + lower-bound-style estimate of what is left

    @property
    def shapes(self) -> list[Shape]:
        return [o.shape for o in self.options]

    @property
    def models(self) -> frozenset[str]:
        return frozenset(o.shape[0] for o in self.options)

    def key(self) -> tuple:
        """The paper's order: higher throughput, fewer devices, then a deterministic shape order."""
        return (-self.throughput, self.devices, tuple(o.shape for o in self.options))

    def est_key(self) -> tuple:
        """Our order: smaller estimated makespan, then the paper's."""
        return (self.est_makespan_s,) + self.key()


@dataclass(frozen=True)
class Outlook:
    """Per model, what finishing it alone would take from now: device-seconds (area) of its most
    device-efficient option and its fastest finish (critical path)."""

    area: dict[str, float]
    crit: dict[str, float]
    devices: int

    def estimate(self, options: tuple[Option, ...], stage: float) -> float:
        """stage + max(area left / devices, longest critical path left): a makespan estimate that
        sees the models a group leaves out, which throughput alone does not."""
        left = dict.fromkeys(self.area, 1.0)
        for o in options:
            total = o.run.total_work
            left[o.shape[0]] = 1.0 - (o.work_by(stage) / total if total > 0 else 1.0)
        area = sum(self.area[m] * f for m, f in left.items())
        crit = max((self.crit[m] * f for m, f in left.items()), default=0.0)
        return stage + max(area / self.devices, crit)


@dataclass(frozen=True)
class _Held(Option):
    """An option of a model that waits for a model outside its group: it works on its released
    requests only (`cap`: their useful work) and cannot end the stage."""

    cap: float = 0.0

    @property
    def finish_s(self) -> float:
        return math.inf

    def work_by(self, t: float) -> float:
        return min(Option.work_by(self, t), self.cap)


@dataclass(frozen=True)
class Flow:
    """What dependent requests let a group's options do (see the module docstring)."""

    waiting: Waiting
    max_num_seqs: dict[str, int]
    order: list[str]  # the models left, upstream first

    def adjust(self, options: tuple[Option, ...]) -> tuple[Option, ...]:
        models = frozenset(o.shape[0] for o in options)
        out: list[Option] = []
        ends: dict[str, float] = {}
        for o in options:  # upstream models first (the expansion order)
            m = o.shape[0]
            if not self.waiting.can_finish(m, models):
                cap = self.waiting.released.get(m, 0.0) * o.run.total_work
                out.append(_Held(**{f.name: getattr(o, f.name)
                                    for f in dataclasses.fields(Option)}, cap=cap))
                continue
            end = o.finish_s
            for u in self.waiting.up.get(m, ()):
                if u in ends:
                    end = max(end, ends[u] + self._tail(o))
            ends[m] = end
            out.append(o if end <= o.finish_s else dataclasses.replace(
                o, warm_s=end - o.run.total_s))
        return tuple(out)

    def estimate(self, outlook: Outlook, options: tuple[Option, ...], stage: float) -> float:
        """`Outlook.estimate` along the model DAG: a model of the group that can finish takes what
        is left of its run (its start is paid); any other finishes after what it waits for, then
        takes its critical path's share left. So deferring a downstream model costs its start and
        run after its upstream's end, and starting it early (pipelined) is seen to pay off."""
        if stage == math.inf:
            return math.inf
        left = dict.fromkeys(outlook.area, 1.0)
        own: dict[str, float] = {}
        for o in options:
            m, total = o.shape[0], o.run.total_work
            left[m] = 1.0 - (o.work_by(stage) / total if total > 0 else 1.0)
            if o.finish_s < math.inf:
                own[m] = max(0.0, o.finish_s - stage)
        path: dict[str, float] = {}
        for m in self.order:
            if m in own:
                path[m] = own[m]
            else:
                after = max((path[u] for u in self.waiting.up.get(m, ()) if u in path), default=0.0)
                path[m] = after + outlook.crit[m] * left[m]
        area = sum(outlook.area[m] * f for m, f in left.items())
        return stage + max(area / outlook.devices, max(path.values(), default=0.0))

    def _tail(self, o: Option) -> float:
        """How long the last requests released to `o` take: one wave of the run (its length over
        the batches of max_num_seqs requests per replica it runs)."""
        n = len(o.run.finish_sorted)
        waves = -(-n // (unpack(o.shape)[2] * self.max_num_seqs[o.shape[0]])) if n else 1
        return o.run.total_s / max(1, waves)


def _group(options: tuple[Option, ...], outlook: Outlook | None = None,
           pool: DevicePool | None = None, flow: Flow | None = None) -> Group:
    """A candidate group; with `pool`, its options' starts are priced with every engine the group
    starts at once (start contention, `scheduler.stages`); with `flow`, they are scored for what
    their dependencies let them do (a group whose every option waits has stage_s = inf)."""
    if not options:
        return Group((), 0, float("inf"), 0.0)
    if pool is not None:
        starting = sum(o.starting for o in options)
        options = tuple(o.in_group(starting, pool) for o in options)
    scored = flow.adjust(options) if flow is not None else options
    stage = min(o.finish_s for o in scored)
    work = sum(o.work_by(stage) for o in scored)
    if outlook is None:
        est = float("inf")
    else:
        est = outlook.estimate(scored, stage) if flow is None else flow.estimate(outlook, scored,
                                                                                  stage)
    return Group(options, sum(o.devices for o in options), stage,
                 work / stage if stage > 0 else float("inf"), est)


def rank_groups(ctx: Context, state: PlanState, top_k: int = 20) -> list[Group]:
    """Candidate stage groups for `state`, best first (never empty while work remains)."""
    n = ctx.pool.count
    todo = [m for m in ctx.order if m in state.work]
    per_model = {m: ctx.best_per_count(state, m, n) for m in todo}
    flow = None if ctx.dag is None else Flow(ctx.waiting(state), {
        m: ctx.est.models[m].max_num_seqs for m in todo}, todo)
    outlook = Outlook({m: min(o.devices * o.finish_s for o in per_model[m]) for m in todo},
                      {m: min(o.finish_s for o in per_model[m]) for m in todo}, n)
    groups = [_group(())]
    for m in todo:
        grown = list(groups)  # leaving m out of the stage
        for g in groups:
            for opt in per_model[m]:
                if g.devices + opt.devices <= n:
                    grown.append(_group(g.options + (opt,), outlook, ctx.pool, flow))
        # keep the paper's top_k by throughput and our top_k by estimated makespan; the empty
        # group ranks last in both and survives only while fewer than top_k others exist
        by_tp = sorted(grown, key=Group.key)[:top_k]
        by_est = sorted(grown, key=Group.est_key)[:top_k]
        groups = sorted({g.key(): g for g in by_tp + by_est}.values(), key=Group.key)
    # dependent work: a group makes progress when one of its models can finish (stage_s < inf);
    # in a cycle of the model graph, when one has released requests (the stage drains them)
    moves = [g for g in groups if g.options and (flow is None or g.stage_s < math.inf)]
    if not moves and flow is not None:
        moves = [g for g in groups if g.options and any(flow.waiting.released.get(m, 0.0) > 0
                                                        for m in g.models)]
    complete = [g for g in moves if _no_idle(g, todo, per_model, n)]
    ranked = _prune(complete) or sorted(moves or (g for g in groups if g.options), key=Group.key)
    ranked.sort(key=Group.est_key)
    placeable = [g for g in ranked if place(g.shapes, ctx.pool, state.preferred()) is not None]
    return placeable or ranked


def _no_idle(g: Group, todo: list[str], per_model: dict[str, list[Option]], n: int) -> bool:
    """False if some left-out model has an option fitting in the devices the group leaves idle."""
    free = n - g.devices
    if free == 0:
        return True
    used = g.models
    return not any(o.devices <= free for m in todo if m not in used for o in per_model[m])


def _prune(groups: list[Group]) -> list[Group]:
    """Dominance: drop a group if another with the same shapes is better, or if a group that
    extends it with more models has higher throughput (it reaches further with the same engines)."""
    seen: dict[frozenset, Group] = {}
    for g in sorted(groups, key=Group.key):
        seen.setdefault(frozenset(g.shapes), g)
    uniq = sorted(seen.values(), key=Group.key)
    out = []
    for g in uniq:
        mine = set(g.shapes)
        if any(h is not g and mine < set(h.shapes) and h.throughput > g.throughput + EPS
               for h in uniq):
            continue
        out.append(g)
    return out


def greedy_chooser(top_k: int):
    """The paper's greedy: always take the best-ranked group."""

    def choose(ctx: Context, state: PlanState) -> list[Shape]:
        return rank_groups(ctx, state, top_k)[0].shapes

    return choose
