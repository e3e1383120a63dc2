"""A running plan grown by replicas: more DP of the same TP and threads, its engines kept.

The runtime keeps the engines of replicas a stage still wants and starts only the new ones
(`runtime.executor.slots`): the old replicas serve on while the new ones start, and keep their
requests in flight; the queue goes to whichever replica has room. The planner prices a growth in
two phases: the running plan continues (kept) for the new replicas' start, then the grown plan
runs what is left, its requests in flight re-prefilled (an over-charge: the kept replicas still
hold their KV, a small one beside a start). When the running plan finishes first, the new
replicas were started for nothing and the model ends with the old ones.

Before, a growth was priced as a restart of every replica (a start each, all progress re-done):
`bench.fresh`'s samullm batch 2 (5 Dec 2026) was first planned with medium on one core for 15 s
while the other idled (19.9 s predicted), then re-planned onto two replicas, and ran in 14.0 s.
Dependent work (`Context.dag`) keeps the restart pricing.
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.estimator import Estimator, PlanRun, Workload
from scheduler.types import ExecPlan


def grows(cur: ExecPlan | None, tp: int, dp: int, threads: int) -> bool:
    """Whether (tp, dp, threads) is `cur` with more replicas (placed on cur's devices first)."""
    return cur is not None and (cur.tp, cur.threads) == (tp, threads) and dp > cur.dp


def grows_into(cur: ExecPlan | None, plan: ExecPlan) -> bool:
    """Whether `plan` keeps every replica of `cur` and adds some."""
    return cur is not None and plan.dp > cur.dp and cur.within(plan)


@dataclass(frozen=True)
class Growth:
    """A model's run while its plan grows from `old_dp` to `dp` replicas, the new ones ready after
    `warm_s`: `head` the running plan's run (kept), `rest` what is left when the new replicas are
    ready and `tail` the grown plan's run of it (both None when the head finishes first)."""

    name: str  # the estimator's model (variant) name
    tp: int
    old_dp: int
    dp: int
    work: Workload
    warm_s: float
    head: PlanRun
    rest: Workload | None
    tail: PlanRun | None

    @property
    def finish_s(self) -> float:
        return self.head.total_s if self.tail is None else self.warm_s + self.tail.total_s

    @property
    def run(self) -> PlanRun:
        """The run that finishes the model (the grown plan's, or the head's)."""
        return self.head if self.tail is None else self.tail

    def left(self, est: Estimator, elapsed_s: float) -> Workload:
        """The work left `elapsed_s` after the growth began."""
        if self.rest is None or elapsed_s <= self.warm_s:
            return est.advance(self.name, self.tp, self.old_dp, self.work, elapsed_s, kept=True)
        return est.advance(self.name, self.tp, self.dp, self.rest, elapsed_s - self.warm_s)


def grow(est: Estimator, name: str, tp: int, old_dp: int, dp: int, work: Workload,
         warm_s: float) -> Growth:
    head = est.run(name, tp, old_dp, work, kept=True)
    if head.total_s <= warm_s:
        return Growth(name, tp, old_dp, dp, work, warm_s, head, None, None)
    rest = est.advance(name, tp, old_dp, work, warm_s, kept=True)
    return Growth(name, tp, old_dp, dp, work, warm_s, head, rest, est.run(name, tp, dp, rest))
