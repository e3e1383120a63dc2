"""A running plan grown by replicas (`scheduler.growth`): the runtime keeps the running replicas
and starts only the new ones, so the planner prices the old replicas serving on during the start
and no restart of them."""

from __future__ import annotations

import pytest

from scheduler.growth import grow
from scheduler.planner import Planner, plan
from scheduler.stages import run_stage
from scheduler.types import ExecPlan, SimRequest
from tests.scheduler.test_asleep import LOAD_S, problem

ONE, TWO = ExecPlan("a-model", 1, 1, (0,)), ExecPlan("a-model", 1, 2, (0, 1))


def many(n: int) -> dict:
    return {"a-model": [SimRequest(i, 50, 200) for i in range(n)],
            "b-model": [SimRequest(i, 50, 20) for i in range(8)]}


def test_a_grown_plan_keeps_its_running_replica_serving_while_the_new_one_starts() -> None:
    pr = problem(running={"a-model": ONE})
    pr.work = many(1024)  # 31 s on one replica, a start 5.5 s
    planner = Planner(pr)
    ctx, state = planner.exact_ctx, planner.initial_state()
    stage, after = run_stage(ctx, state, [TWO])
    kept_alone, _ = run_stage(ctx, state, [ONE])
    cold, _ = run_stage(ctx, type(state)(0.0, state.work), [TWO])  # nothing running: both start
    got = stage.predicted_finish_s["a-model"]
    assert got < kept_alone.predicted_finish_s["a-model"]  # the second replica pays off
    assert got < cold.predicted_finish_s["a-model"]  # the first serves on during the start
    est = ctx.est
    g = grow(est, "a-model", 1, 1, 2, state.work["a-model"], ctx.start_s("a-model", 1, 1))
    assert got == g.finish_s and g.tail is not None
    assert stage.restarts == ["a-model"]


def test_a_plan_done_before_its_new_replicas_are_up_ends_on_the_old_ones() -> None:
    pr = problem(running={"a-model": ONE})
    pr.work = many(2)
    planner = Planner(pr)
    ctx, state = planner.exact_ctx, planner.initial_state()
    stage, after = run_stage(ctx, state, [TWO])
    head = ctx.est.run("a-model", 1, 1, state.work["a-model"], kept=True)
    assert head.total_s < LOAD_S
    assert stage.predicted_finish_s["a-model"] == head.total_s
    assert "a-model" not in after.work


def test_samullm_grows_the_long_model_onto_the_core_the_short_one_frees() -> None:
    """a (long) and b (short) each on a core: once b is done, a second replica of a on b's core
    (a start) beats a alone, since a's first replica serves on meanwhile."""
    pr = problem(running={"a-model": ONE, "b-model": ExecPlan("b-model", 1, 1, (1,))})
    pr.work = many(256)
    got = plan(pr, "samullm")
    last = got.stages[-1]
    assert [(p.model, p.dp) for p in last.plans] == [("a-model", 2)], got.stages
    assert got.stages[0].plans[0].same_shape(ONE) and last.plans[0].devices == (0, 1)


@pytest.mark.parametrize("room", [None, 4 * 2**30])
def test_a_growth_stops_and_puts_to_sleep_nothing(room) -> None:
    """The running replicas of a grown plan are kept: the stage waits for no stop of them (priced
    2 s here) and does not put them to sleep."""
    pr = problem(running={"a-model": ONE}, stop_s=2.0, sleep_room=room,
                 engine_bytes={"a-model": 2**30, "b-model": 2**30})
    pr.work = many(1024)
    planner = Planner(pr)
    ctx, state = planner.exact_ctx, planner.initial_state()
    stage, after = run_stage(ctx, state, [TWO])
    g = grow(ctx.est, "a-model", 1, 1, 2, state.work["a-model"], ctx.start_s("a-model", 1, 1))
    assert stage.predicted_finish_s["a-model"] == pytest.approx(g.finish_s)
    assert after.asleep == {} and after.sleep_room == room
