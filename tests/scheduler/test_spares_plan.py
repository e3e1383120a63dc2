"""Spare engine processes in the plan: each engine started takes a ready spare, in the stage's plan
order, and a start without one pays `no_spare_s` more; a spare taken stays taken for the rest of
the plan (`scheduler.stages`). Before this, the planner charged every start or none, by whether a
spare was ready at planning time, and under-predicted even-split's third start round by ~8 s."""

from __future__ import annotations

import dataclasses

import pytest

from scheduler.estimator import Estimator
from scheduler.planner import Planner, PlanningProblem
from scheduler.stages import Context, PlanState, run_stage
from scheduler.types import DevicePool, ExecPlan, SimRequest
from tests.scheduler.test_start_contention import GiB, LOAD_S, ONE_HEAD, _work, lat

IMPORT_S = 7.0


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
    for spares, a_extra, b_extra, left in [(3, 0, 0, 0), (2, 0, IMPORT_S, 0),
                                           (1, IMPORT_S, IMPORT_S, 0), (5, 0, 0, 2)]:
        stage, after = run_stage(ctx, PlanState(0.0, work, spares=spares), plans)
        # a's two replicas need two spares: with one, its start (the later replica) pays the import
        assert stage.predicted_finish_s["a"] == pytest.approx(LOAD_S + a_extra + run_a.total_s)
        assert stage.predicted_finish_s["b"] == pytest.approx(LOAD_S + b_extra + run_b.total_s)
        assert after.spares == left


def test_kept_engines_take_no_spare_and_none_means_not_modelled() -> None:
    ctx, work = _ctx(), _work()
    a, b = ExecPlan("a", 1, 1, (0,)), ExecPlan("b", 1, 1, (1,))
    stage, after = run_stage(ctx, PlanState(0.0, work, {"a": a}, {}, spares=1), [a, b])
    assert stage.restarts == ["b"] and after.spares == 0
    assert stage.predicted_finish_s["b"] == pytest.approx(
        LOAD_S + ctx.est.run("b", 1, 1, work["b"]).total_s)
    stage, after = run_stage(ctx, PlanState(0.0, work), [a, b])
    assert after.spares is None and stage.predicted_finish_s["a"] == pytest.approx(
        LOAD_S + ctx.est.run("a", 1, 1, work["a"]).total_s)


def test_option_is_charged_when_too_few_spares_for_its_replicas() -> None:
    ctx, work = _ctx(), _work()
    assert ctx.option(PlanState(0.0, work, spares=1), ("a", 1, 1)).warm_s == LOAD_S
    assert ctx.option(PlanState(0.0, work, spares=1), ("a", 1, 2)).warm_s == LOAD_S + IMPORT_S
    assert ctx.option(PlanState(0.0, work), ("a", 1, 2)).warm_s == LOAD_S
    # re-priced in a group: contention on the load, the spare charge kept
    opt = ctx.option(PlanState(0.0, work, spares=0), ("a", 1, 1))
    pool = dataclasses.replace(ctx.pool, start_contention=0.5)
    assert opt.in_group(3, pool).warm_s == pytest.approx(LOAD_S * 2.0 + IMPORT_S)


def _three_models(spares: int | None) -> Planner:
    models = {m: dataclasses.replace(ONE_HEAD, name=m) for m in ("a", "b", "c")}
    work = {m: [SimRequest(i, 50, 20 * (k + 1)) for i in range(32)]
            for k, m in enumerate(models)}
    return Planner(PlanningProblem(models, work, DevicePool("cpu", (0, 1), GiB // 4), lat,
                                   lambda s, tp: GiB // 4, spares=spares, no_spare_s=IMPORT_S))


@pytest.mark.parametrize("strategy", ["sequential", "even-split", "samullm"])
def test_the_plan_pays_the_import_once_the_spares_run_out(strategy: str) -> None:
    """Three models on two cores: whichever way it goes, the third engine started finds no spare
    when there were two, and every start pays when there were none."""
    plain = _three_models(None).plan(strategy)
    starts = sum(p.dp for st in plain.stages for p in st.plans if p.model in st.restarts)
    assert starts >= 3
    assert _three_models(starts).plan(strategy).makespan_s == pytest.approx(plain.makespan_s)
    fewer = _three_models(starts - 1).plan(strategy).makespan_s
    assert plain.makespan_s < fewer <= plain.makespan_s + IMPORT_S + 1e-6
    none = _three_models(0).plan(strategy)
    assert none.makespan_s > fewer
