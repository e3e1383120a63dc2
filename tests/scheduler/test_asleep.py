"""Engines asleep (`PlanningProblem.asleep`, CPU engines frozen by the runtime): a stage that runs
the same plan wakes them in `stages.WAKE_S` instead of paying a start, on the devices they sleep
on; another shape, or another placement, starts as before."""

from __future__ import annotations

import pytest

from scheduler.planner import PlanningProblem, plan
from scheduler.stages import WAKE_S
from scheduler.types import DevicePool, ExecPlan, SimRequest
from tests.scheduler.test_planner import cpu_spec, lat_fn

GiB = 1024**3
A = cpu_spec("a-model", 2, 128)
B = cpu_spec("b-model", 2, 128)
LOAD_S = 5.0


def problem(**kw) -> PlanningProblem:
    work = {"a-model": [SimRequest(i, 50, 20) for i in range(20)],
            "b-model": [SimRequest(i, 50, 20) for i in range(20)]}
    pool = DevicePool("cpu", (0, 1), GiB)
    return PlanningProblem({A.name: A, B.name: B}, work, pool, lat_fn("cpu", LOAD_S),
                           lambda s, tp: GiB // 4, **kw)


@pytest.mark.parametrize("strategy", ["samullm", "sequential"])
def test_an_engine_asleep_is_woken_not_started(strategy: str) -> None:
    cold = plan(problem(), strategy)
    asleep = {m: p for st in cold.stages for p in st.plans for m in [p.model]}
    warm = plan(problem(asleep=asleep), strategy)
    # every model's engine sleeps as the cold plan would run it: no start is paid at all
    assert warm.makespan_s <= cold.makespan_s - LOAD_S * 0.9
    first = warm.stages[0]
    for p in first.plans:
        assert p.same_shape(asleep[p.model])  # woken where it sleeps
        assert first.predicted_finish_s[p.model] >= WAKE_S
    assert first.restarts == []


def test_only_the_same_plan_wakes_and_asleep_engines_keep_their_devices_in_placement() -> None:
    from scheduler.placement import make_shape, place
    from scheduler.stages import PlanState
    sleeping = ExecPlan("a-model", 1, 1, (1,))
    state = PlanState(0.0, {}, asleep={"a-model": sleeping})
    assert state.wakes(ExecPlan("a-model", 1, 1, (1,)))
    assert not state.wakes(ExecPlan("a-model", 1, 1, (0,)))  # elsewhere: a start
    assert not state.wakes(ExecPlan("a-model", 2, 1, (0, 1)))
    assert not state.wakes(ExecPlan("b-model", 1, 1, (1,)))
    pool = DevicePool("cpu", (0, 1), GiB)
    [got] = place([make_shape("a-model", 1, 1, 1)], pool, state.preferred())
    assert got.devices == (1,)  # placed where it sleeps (by default the first free core, 0)
    [fresh] = place([make_shape("a-model", 1, 1, 1)], pool, {})
    assert fresh.devices == (0,)


def test_the_lower_bound_allows_for_a_wake() -> None:
    cold = plan(problem(lower_bound=True), "samullm")
    asleep = {p.model: p for st in cold.stages for p in st.plans}
    warm = plan(problem(lower_bound=True, asleep=asleep), "samullm")
    assert warm.lower_bound_s <= warm.makespan_s + 1e-9
    assert warm.lower_bound_s < cold.lower_bound_s - LOAD_S * 0.9


def test_fewer_replicas_of_a_plan_keep_or_wake_its_engines() -> None:
    """The runtime keeps (or wakes) one engine per replica: one replica of a two-replica plan,
    running or asleep, starts nothing, and is placed on the first replica's devices."""
    from scheduler.placement import make_shape, place
    two = {m: ExecPlan(m, 1, 2, (0, 1)) for m in ("a-model", "b-model")}
    [one] = place([make_shape("a-model", 1, 1, 1)], DevicePool("cpu", (0, 1), GiB), two)
    assert one.devices == (0,) and one.within(two["a-model"])
    assert not ExecPlan("a-model", 2, 1, (0, 1)).within(two["a-model"])  # TP 2: a start
    for kind in ("asleep", "running"):
        got = plan(problem(**{kind: two}), "samullm")
        cold = plan(problem(), "samullm")
        assert all(st.restarts == [] for st in got.stages), (kind, got.stages)
        assert got.makespan_s < cold.makespan_s - LOAD_S * 0.9
