"""`samullm`'s second objective: the batches' own completions (`PlanningProblem.batch_slack`).

The pool's makespan decides first; among the schedules found within the slack of it, the one whose
batches (`groups`) complete soonest in sum is taken."""

from __future__ import annotations

import dataclasses

import pytest

from scheduler.planner import Planner, PlanningProblem, plan
from scheduler.types import DevicePool, ExecPlan, SimRequest
from tests.scheduler.test_planner import cpu_spec, lat_fn

GiB = 1024**3
BIG = cpu_spec("big-model", 8, 512)
SMALL = cpu_spec("small-model", 2, 128)


def problem(cores: int = 1, **kw) -> PlanningProblem:
    """One batch of 200 requests on the bigger model, one of 5 on the smaller, on `cores` cores."""
    work = {"big-model": [SimRequest(i, 100, 100) for i in range(200)],
            "small-model": [SimRequest(i, 100, 20) for i in range(5)]}
    groups = {"big-model": {i: "big" for i in range(200)},
              "small-model": {i: "small" for i in range(5)}}
    pool = DevicePool("cpu", tuple(range(cores)), GiB)
    return PlanningProblem({BIG.name: BIG, SMALL.name: SMALL}, work, pool, lat_fn("cpu", 5.0),
                           lambda s, tp: GiB // 4, **{"groups": groups, **kw})


def test_a_small_batchs_model_goes_first_where_the_pool_finishes_alike() -> None:
    alone = plan(problem())
    assert [p.model for p in alone.stages[0].plans] == ["big-model"]  # the makespan's own pick
    assert alone.group_finish_s["small"] == pytest.approx(alone.makespan_s, rel=0.05)
    both = plan(problem(batch_slack=0.02))
    assert [p.model for p in both.stages[0].plans] == ["small-model"]
    assert both.makespan_s <= alone.makespan_s * 1.02
    assert both.group_finish_s["small"] < 0.2 * alone.group_finish_s["small"]
    assert sum(both.group_finish_s.values()) < sum(alone.group_finish_s.values())


def test_no_slack_no_groups_or_one_group_leave_the_makespans_choice() -> None:
    base = plan(problem())
    for kw in ({"batch_slack": 0.0}, {"batch_slack": 0.02, "groups": None}):
        got = plan(problem(**kw))
        assert [[p.model for p in st.plans] for st in got.stages] == \
            [[p.model for p in st.plans] for st in base.stages]
    one = problem(batch_slack=0.02)
    one.groups = {m: {r: "only" for r in of} for m, of in one.groups.items()}
    assert [p.model for p in plan(one).stages[0].plans] == ["big-model"]


def test_a_running_engine_is_not_stopped_for_the_batches_objective() -> None:
    """The big model's engine runs: running the small batch first would stop it, and the churn
    rule (`replace_margin`) is not undone by the second objective."""
    prob = problem(batch_slack=0.5, running={"big-model": ExecPlan("big-model", 1, 1, (0,))})
    got = Planner(prob).plan("samullm")
    assert [p.model for p in got.stages[0].plans] == ["big-model"]
