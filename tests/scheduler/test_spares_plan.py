"""Spare engine processes in the plan (`scheduler.spares`): each engine started takes a ready spare
in the stage's plan order, a start without one pays `no_spare_s` more, and a spare taken is
re-imported on the stage's idle cores once its engine is up. Before this the planner charged every
start or none, by whether a spare was ready at planning time, and under-predicted even-split's
fourth start by ~8 s; a first version that never refilled over-predicted sequential's by 21 %."""

from __future__ import annotations

import dataclasses

import pytest

from scheduler.estimator import Estimator
from scheduler.planner import Planner, PlanningProblem
from scheduler.spares import SpareSlot, advance, ready_count, slots_of, take
from scheduler.stages import Context, PlanState, run_stage
from scheduler.types import DevicePool, ExecPlan, SimRequest
from tests.scheduler.test_start_contention import GiB, LOAD_S, ONE_HEAD, _work, lat

IMPORT_S = 7.0


def test_take_hands_out_ready_spares_and_queues_their_replacements() -> None:
    slots = (SpareSlot(), SpareSlot(0.0, 3.0), SpareSlot())
    out = take(slots, 3, up_s=15.0, import_s=IMPORT_S)  # three engines, two ready spares
    assert ready_count(out) == 0
    assert out == (SpareSlot(15.0, IMPORT_S), SpareSlot(0.0, 3.0), SpareSlot(15.0, IMPORT_S))
    assert slots_of(None) is None and ready_count(slots_of((0.0, 2.0))) == 1


def test_advance_shares_the_idle_cores_from_each_spares_own_start() -> None:
    two = (SpareSlot(0.0, 7.0), SpareSlot(0.0, 7.0))
    assert advance(two, 100.0, 0) == two  # every core busy: nothing moves
    assert advance(two, 7.0, 2) == (SpareSlot(), SpareSlot())  # one core each
    assert advance(two, 7.0, 1) == (SpareSlot(0.0, 3.5), SpareSlot(0.0, 3.5))  # half a core each
    # the second waits 4 s for its engine: the first has the core alone until then
    late = advance((SpareSlot(0.0, 7.0), SpareSlot(4.0, 7.0)), 10.0, 1)
    assert late[0].import_s == pytest.approx(0.0) and late[1].import_s == pytest.approx(4.0)
    # 4 s alone (4 done), then halves: the first is done 6 s later at t = 10
    assert advance((SpareSlot(0.0, 7.0), SpareSlot(20.0, 7.0)), 5.0, 1) == (
        SpareSlot(0.0, 2.0), SpareSlot(15.0, 7.0))


def _ctx(no_spare_s: float = IMPORT_S) -> Context:
    models = {m: dataclasses.replace(ONE_HEAD, name=m) for m in ("a", "b")}
    est = Estimator(models, lat, lambda s, tp: GiB // 4)
    return Context(est, DevicePool("cpu", (0, 1, 2, 3), GiB // 4), ["a", "b"],
                   no_spare_s=no_spare_s)


def test_run_stage_hands_spares_out_in_plan_order() -> None:
    ctx, work = _ctx(), _work()
    plans = [ExecPlan("a", 1, 2, (0, 1)), ExecPlan("b", 1, 1, (2,))]
    run_b = ctx.est.run("b", 1, 1, work["b"])
    run_a = ctx.est.run("a", 1, 2, work["a"])
    for ready, a_extra, b_extra in [(3, 0, 0), (2, 0, IMPORT_S), (1, IMPORT_S, IMPORT_S)]:
        spares = slots_of([0.0] * ready + [50.0] * (3 - ready))
        stage, after = run_stage(ctx, PlanState(0.0, work, spares=spares), plans)
        # a's two replicas need two spares: with one, its start (the later replica) pays the import
        assert stage.predicted_finish_s["a"] == pytest.approx(LOAD_S + a_extra + run_a.total_s)
        assert stage.predicted_finish_s["b"] == pytest.approx(LOAD_S + b_extra + run_b.total_s)
        # one core was idle all stage: the replacements, queued behind their engines' starts, ran
        assert len(after.spares) == 3 and ready_count(after.spares) < 3


def test_kept_engines_take_no_spare_and_none_means_no_spares() -> None:
    ctx, work = _ctx(), _work()
    a, b = ExecPlan("a", 1, 1, (0,)), ExecPlan("b", 1, 1, (1,))
    stage, after = run_stage(ctx, PlanState(0.0, work, {"a": a}, {}, spares=slots_of([0.0])),
                             [a, b])
    assert stage.restarts == ["b"]
    assert stage.predicted_finish_s["b"] == pytest.approx(
        LOAD_S + ctx.est.run("b", 1, 1, work["b"]).total_s)
    # the stage ends when kept a finishes, before b is up: b's replacement still waits for b
    assert stage.end_s < LOAD_S
    assert after.spares == (SpareSlot(LOAD_S - stage.end_s, IMPORT_S),)
    stage, after = run_stage(ctx, PlanState(0.0, work), [a, b])
    assert after.spares is None and stage.predicted_finish_s["a"] == pytest.approx(
        LOAD_S + ctx.est.run("a", 1, 1, work["a"]).total_s)


def test_option_is_charged_when_too_few_spares_for_its_replicas() -> None:
    ctx, work = _ctx(), _work()
    one = slots_of([0.0, 5.0])
    assert ctx.option(PlanState(0.0, work, spares=one), ("a", 1, 1)).warm_s == LOAD_S
    assert ctx.option(PlanState(0.0, work, spares=one), ("a", 1, 2)).warm_s == LOAD_S + IMPORT_S
    assert ctx.option(PlanState(0.0, work), ("a", 1, 2)).warm_s == LOAD_S
    # re-priced in a group: contention on the load, the spare charge kept
    opt = ctx.option(PlanState(0.0, work, spares=slots_of([3.0])), ("a", 1, 1))
    pool = dataclasses.replace(ctx.pool, start_contention=0.5)
    assert opt.in_group(3, pool).warm_s == pytest.approx(LOAD_S * 2.0 + IMPORT_S)


def _three_models(spares: tuple[float, ...] | None, cores: int = 2) -> Planner:
    models = {m: dataclasses.replace(ONE_HEAD, name=m) for m in ("a", "b", "c")}
    work = {m: [SimRequest(i, 50, 20 * (k + 1)) for i in range(32)]
            for k, m in enumerate(models)}
    return Planner(PlanningProblem(models, work, DevicePool("cpu", tuple(range(cores)), GiB // 4),
                                   lat, lambda s, tp: GiB // 4, spares=spares,
                                   no_spare_s=IMPORT_S))


def _engine_starts(schedule) -> int:
    return sum(p.dp for st in schedule.stages for p in st.plans if p.model in st.restarts)


@pytest.mark.parametrize("strategy", ["sequential", "even-split", "samullm"])
def test_the_plan_pays_the_import_once_the_spares_run_out(strategy: str) -> None:
    plain = _three_models(None).plan(strategy)
    starts = _engine_starts(plain)
    assert starts >= 3
    assert _three_models((0.0,) * starts).plan(strategy).makespan_s == pytest.approx(
        plain.makespan_s)
    # none ready and none coming soon (every import just begun, 1000 s of it): every start pays
    slow = _three_models((1000.0,) * 2).plan(strategy).makespan_s
    assert slow > plain.makespan_s + IMPORT_S - 1e-6
    assert _three_models((0.0,) * (starts - 1)).plan(strategy).makespan_s <= slow


def test_sequential_refills_on_the_idle_core_even_split_does_not() -> None:
    """The makespan bench's two cases (1 Dec): with two spares, sequential's one-core starts leave a
    core on which a taken spare is re-imported before its next start; a stage that keeps both
    cores busy gives the replacement nothing, so the next start pays."""
    a = ExecPlan("a", 1, 1, (0,))
    ctx = _ctx()
    two_cores = dataclasses.replace(ctx, pool=DevicePool("cpu", (0, 1), GiB // 4))
    work = _work(400)
    stage, after = run_stage(two_cores, PlanState(0.0, work, spares=slots_of([0.0])), [a])
    assert stage.end_s > LOAD_S + IMPORT_S and after.spares[0].ready  # the stage outlasts start + import on the idle core
    busy = [a, ExecPlan("b", 1, 1, (1,))]
    _, after = run_stage(two_cores, PlanState(0.0, work, spares=slots_of([0.0, 0.0])), busy)
    assert ready_count(after.spares) == 0
