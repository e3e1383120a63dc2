"""A stage of dependent work: when each request may start, and what is left when the stage ends.

Arrivals couple a stage's models: a downstream request may start only once its last upstream request
finished (`scheduler.dag`), and when that is depends on the upstream model's plan and start. So a
stage with dependent requests is not read off cached root runs (`scheduler.estimator`); it is
simulated model by model in the DAG's model order (upstream first):

- a request whose upstream requests all finished before the stage arrives at the stage start (or
  at its own `arrival_s`); one waiting for a model of the stage arrives when the last of those
  requests finishes in that model's run, which is simulated already (pipelined: a downstream model
  starts on the first released requests); one waiting for a request of its own model waits inside
  the run (`simulate(depends=...)`);
- one waiting for a model not in the stage (or for a model later in the order: a cycle of the model
  graph, broken here at the stage) is *held*: left out of this stage's run. A model with held
  requests cannot finish in the stage, so it never ends it (`scheduler.stages.run_stage`).

An engine kept from the previous stage continues its run exactly when nothing it waits for changed
(the same requests, arriving at the same times: its upstream engines continue too), as a kept
engine continues its root run in `scheduler.estimator`; otherwise it is simulated again on what it
has left, its in-flight requests re-prefilled (a kept engine that receives newly released requests
is thus slightly over-charged).

What a model has left after the stage is exact (the run cut at the stage end, plus its held
requests). For ranking the next stage's candidates (`scheduler.search`, the baselines) that work is
also a position on its *root* run (the model's initial work, requests of other models released at
once), at the fraction of requests done, so candidates are priced without simulating
(`Estimator._derived_run`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from scheduler.dag import Dag, Key
from scheduler.estimator import Estimator
from scheduler.runs import Position, TimedRun, Workload, _rid
from scheduler.types import ExecPlan, SimRequest

TOL = 1e-9


@dataclass(frozen=True)
class Placed:
    """A model's run in one stage of dependent work, on the planning clock."""

    run: TimedRun
    origin_s: float  # when the run's time 0 is (its engine ready)
    arrival: dict[int, float]  # rid -> when each request the run was simulated with arrives
    held: tuple[SimRequest, ...]  # pending requests left out: they wait for work outside the stage
    shape: tuple[str, int, int]  # (estimator model name, tp, dp)
    end_s: float  # when its last request of this stage finishes (inf: it has none)

    def finish_s(self, rid: int) -> float:
        return self.origin_s + self.run.finish[rid]

    def admitted_s(self, rid: int) -> float:
        return self.origin_s + self.run.admitted[rid]


def simulate_stage(est: Estimator, dag: Dag, t: float, work: Mapping[str, Workload],
                   plans: Sequence[ExecPlan], warm: Mapping[str, float],
                   kept: Mapping[str, bool], before: Mapping[str, Placed]) -> dict[str, Placed]:
    """Every model of `plans` run from `t` (each engine ready `warm[model]` later) on its `work`,
    upstream models first; `before`: the previous stage's runs, which kept engines may continue."""
    stage = {p.model: p for p in plans}
    pending = {m: {r.rid for r in w.requests} for m, w in work.items()}
    rank = dag.rank
    finish: dict[Key, float] = {}  # when each request simulated in this stage finishes
    out: dict[str, Placed] = {}
    for m in [m for m in dag.order if m in stage]:
        p = stage[m]
        name = est.variant(m, p.threads)
        reqs = sorted(work[m].requests, key=lambda r: rank.get((m, r.rid), -1))
        arrival: dict[int, float] = {}
        held: list[SimRequest] = []
        for r in reqs:  # upstream before downstream: a held request holds its dependents
            a = max(r.arrival_s, t)
            for u in dag.up.get((m, r.rid), ()):
                if u[1] not in pending.get(u[0], ()):
                    continue  # finished before the stage
                if u in finish:
                    a = max(a, finish[u])
                elif u[0] != m or u[1] not in arrival:
                    break  # outside the stage, later in the order, or held
            else:
                arrival[r.rid] = a
                continue
            held.append(r)
        prev = before.get(m)
        if prev is not None and kept[m] and prev.shape == (name, p.tp, p.dp) \
                and _continues(prev, arrival, t):
            run, origin, arrived = prev.run, prev.origin_s, prev.arrival
        else:
            origin = t + warm[m]
            inputs = tuple(SimRequest(r.rid, r.prompt_len, r.output_len, r.generated,
                                      max(0.0, arrival[r.rid] - origin), r.upstream, r.prefix)
                           for r in sorted(reqs, key=_rid) if r.rid in arrival)
            run, arrived = est.timed_run(name, p.tp, p.dp, inputs), arrival
        ends = [origin + run.finish[rid] for rid in arrival]
        out[m] = Placed(run, origin, arrived, tuple(sorted(held, key=_rid)), (name, p.tp, p.dp),
                        max(ends) if ends else math.inf)
        for rid in arrival:
            finish[(m, rid)] = origin + run.finish[rid]
    return out


def _continues(prev: Placed, arrival: Mapping[int, float], t: float) -> bool:
    """Whether the previous stage's run is still this stage's: the same requests (no held request
    released, none newly held), every one still to arrive arriving when it did."""
    if any(rid not in prev.arrival for rid in arrival):
        return False
    if any(rid not in arrival and prev.run.finish[rid] > t - prev.origin_s + TOL
           for rid in prev.arrival):
        return False  # a request of that run, unfinished, is held now
    for rid, a in arrival.items():
        old = prev.arrival[rid]
        if max(a, old) > t + TOL and abs(a - old) > TOL * max(1.0, abs(a)):
            return False
    return True


def left(est: Estimator, placed: Placed, work: Workload, end_s: float) -> Workload:
    """What `placed`'s model has left when its stage ends at `end_s`: its run cut there (in-flight
    requests with what they generated) and its held requests; for ranking, also a position on the
    model's root run (see the module docstring)."""
    name, tp, dp = placed.shape
    orig = {r.rid: r for r in work.requests}
    # iterations ending at the stage end, within rounding, are done
    cut = est.timed_left(placed.run, (end_s - placed.origin_s) * (1 + 1e-12) + 1e-12)
    reqs = []
    for r in cut:  # the run's requests carry engine-time arrivals: back to the work's own
        o = orig.get(r.rid)
        if o is not None:
            reqs.append(o if r.generated == o.generated else SimRequest(
                o.rid, o.prompt_len, o.output_len, r.generated, o.arrival_s, o.upstream,
                o.prefix))
    return ranked(est, name, tp, dp, work, reqs + list(placed.held))


def ranked(est: Estimator, name: str, tp: int, dp: int, work: Workload,
           remaining: Sequence[SimRequest]) -> Workload:
    """`remaining` (exact) as a derived workload of `work`'s root: the position on its root run on
    (tp, dp) where the same fraction of the root's requests had finished."""
    root = work.pos.root if work.pos is not None else work
    exact = Workload.of(remaining)
    frac = min(1.0, max(0.0, 1.0 - len(exact) / len(root))) if len(root) else 1.0
    t_s = est.run(name, tp, dp, root).time_of_fraction(frac)
    pos = Position(root, tp, dp, t_s, frac)
    out = Workload(exact.requests, f"{exact.fingerprint}~{root.fingerprint}@{tp}x{dp}:{t_s!r}",
                   None, pos)
    out._cache["root"] = exact  # `Estimator.materialize`: the exact requests
    return out
