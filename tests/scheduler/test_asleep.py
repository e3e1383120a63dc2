"""Engines asleep (`PlanningProblem.asleep`, CPU engines frozen by the runtime): a stage that runs
the same plan wakes them in `stops.WAKE_S` instead of paying a start, on the devices they sleep
on; another shape, or another placement, starts as before."""

from __future__ import annotations

import pytest

from scheduler.planner import PlanningProblem, plan
from scheduler.stops import WAKE_S
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


def _ctx_and_state(sleep_room: float | None, stop_s: float = 2.0):
    """A planner's context (stops cost `stop_s`) and its initial state: a-model running on core 0,
    work left for both models."""
    from scheduler.planner import Planner
    running = {"a-model": ExecPlan("a-model", 1, 1, (0,))}
    planner = Planner(problem(running=running, stop_s=stop_s, sleep_room=sleep_room,
                              engine_bytes={"a-model": GiB, "b-model": GiB}))
    return planner.exact_ctx, planner.initial_state()


def test_an_engine_a_stage_replaces_sleeps_when_engines_sleep_and_is_woken_later() -> None:
    """The runtime freezes the CPU engines a stage replaces while the sleep budget allows
    (`runtime.executor.slots`): the stage waits for no stop, and a later stage of the same plan
    wakes it (it was priced a stop and a later start, 5 Dec 2026: `bench.fresh`'s batches 2-3
    planned 21-27 % slower than they ran)."""
    from scheduler.stages import run_stage
    b0, a0 = ExecPlan("b-model", 1, 1, (0,)), ExecPlan("a-model", 1, 1, (0,))
    ctx, state = _ctx_and_state(sleep_room=4 * GiB)
    stage, after = run_stage(ctx, state, [b0])
    assert stage.predicted_finish_s["b-model"] < LOAD_S + 1.0  # its start alone, no stop of a's
    assert after.asleep == {"a-model": a0} and after.sleep_room == 3 * GiB
    back, end = run_stage(ctx, after, [a0])
    assert back.restarts == [] and back.predicted_finish_s["a-model"] - back.start_s < LOAD_S
    assert end.sleep_room == 3 * GiB  # b's engine sleeps now, a's memory is free again
    # without room (or where engines stop: GPU, Ray) the stop is paid and the engine is gone
    for room in (GiB / 2, None):
        ctx, state = _ctx_and_state(sleep_room=room)
        stopped, after = run_stage(ctx, state, [b0])
        assert stopped.predicted_finish_s["b-model"] >= LOAD_S + 2.0
        assert after.asleep == {}
        assert after.sleep_room == room


def test_a_reshape_whose_old_engine_sleeps_pays_no_stop() -> None:
    from scheduler.placement import make_shape
    for room, stop in ((4 * GiB, 0.0), (None, 2.0)):
        ctx, state = _ctx_and_state(sleep_room=room)
        opt = ctx.option(state, make_shape("a-model", 2, 1, 1))  # TP 2: a start, the old one goes
        assert opt.stop_s == stop
