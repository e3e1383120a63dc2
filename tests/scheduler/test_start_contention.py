"""Start contention: engines started together each pay load × (1 + β·(n−1)) — in the stage
mechanics (the real cost), in the options every strategy ranks, and so in the plans chosen."""

from __future__ import annotations

import dataclasses

import pytest

from scheduler.estimator import Estimator, Workload
from scheduler.latency import analytic_latency_model
from scheduler.planner import Planner, PlanningProblem
from scheduler.stages import Context, PlanState, run_stage
from scheduler.types import (CPU_START_CONTENTION, DevicePool, ExecPlan, ModelSpec, SimRequest,
                             default_start_contention)

GiB = 1 << 30
LOAD_S = 25.0
# one attention head: TP=2 is invalid, so "one engine" can only be DP=1 on one core
ONE_HEAD = ModelSpec("small", 4, 256, 1, 1, 1024, 2048, dtype_bytes=4, max_model_len=1024,
                     max_num_seqs=32, max_num_batched_tokens=1024)


def lat(spec: ModelSpec, tp: int):
    return dataclasses.replace(analytic_latency_model(spec, tp, "cpu"), load_time_s=LOAD_S)


def single_model(beta: float, n: int, out: int) -> Planner:
    pool = DevicePool("cpu", (0, 1), GiB // 4, start_contention=beta)
    work = {"small": [SimRequest(i, 100, out) for i in range(n)]}
    return Planner(PlanningProblem({"small": ONE_HEAD}, work, pool, lat, lambda s, tp: GiB // 4))


def first_shapes(planner: Planner, strategy: str = "samullm") -> list[tuple[int, int]]:
    return [(p.tp, p.dp) for p in planner.plan(strategy).stages[0].plans]


def test_start_factor_and_defaults() -> None:
    pool = DevicePool("cpu", (0, 1, 2), GiB, start_contention=0.4)
    assert [pool.start_factor(n) for n in (0, 1, 2, 3)] == pytest.approx([1.0, 1.0, 1.4, 1.8])
    assert DevicePool("cpu", (0,), GiB).start_factor(4) == 1.0  # β defaults to 0 in the scheduler
    assert default_start_contention("cpu") == CPU_START_CONTENTION > 0
    assert default_start_contention("a100") == default_start_contention("cuda") == 0.1


@pytest.mark.parametrize("strategy", ["samullm", "sequential", "per-model-best"])
def test_short_decoding_with_contention_runs_one_engine(strategy: str) -> None:
    """Two concurrent starts cost more than the halved decoding saves: one engine."""
    assert first_shapes(single_model(0.3, 96, 8), strategy) == [(1, 1)]


def test_without_contention_the_old_choice_dp2_stays() -> None:
    planner = single_model(0.0, 96, 8)
    assert first_shapes(planner) == [(1, 2)]
    # β = 0: the two replicas each pay exactly the alone load time
    stage = planner.plan("samullm").stages[0]
    run = planner.est.run("small", 1, 2, planner.initial_state().work["small"])
    assert stage.end_s == pytest.approx(LOAD_S + run.total_s)


def test_long_decoding_is_worth_two_starts() -> None:
    planner = single_model(0.3, 512, 512)
    assert first_shapes(planner) == [(1, 2)]
    run = planner.est.run("small", 1, 2, planner.initial_state().work["small"])
    assert planner.plan("samullm").makespan_s == pytest.approx(LOAD_S * 1.3 + run.total_s)


def _ctx(beta: float, cores: int = 4) -> Context:
    spec = dataclasses.replace(ONE_HEAD, name="a")
    models = {"a": spec, "b": dataclasses.replace(ONE_HEAD, name="b")}
    est = Estimator(models, lat, lambda s, tp: GiB // 4)
    return Context(est, DevicePool("cpu", tuple(range(cores)), GiB // 4, start_contention=beta),
                   ["a", "b"])


def _work(n: int = 40) -> dict[str, Workload]:
    return {m: Workload.of([SimRequest(i, 50, 30 + i) for i in range(n)]) for m in ("a", "b")}


def test_run_stage_charges_every_engine_starting_together() -> None:
    """a on 2 replicas + b on 1: three engines start, each pays 25 s × (1 + 0.5·2) = 50 s."""
    ctx = _ctx(0.5)
    state = PlanState(0.0, _work())
    plans = [ExecPlan("a", 1, 2, (0, 1)), ExecPlan("b", 1, 1, (2,))]
    stage, _ = run_stage(ctx, state, plans)
    run_a = ctx.est.run("a", 1, 2, state.work["a"])
    run_b = ctx.est.run("b", 1, 1, state.work["b"])
    assert stage.predicted_finish_s["a"] == pytest.approx(50.0 + run_a.total_s)
    assert stage.predicted_finish_s["b"] == pytest.approx(50.0 + run_b.total_s)
    assert stage.end_s == pytest.approx(50.0 + min(run_a.total_s, run_b.total_s))
    assert sorted(stage.restarts) == ["a", "b"]


def test_kept_warm_engine_does_not_count_but_a_warming_one_does() -> None:
    ctx = _ctx(0.5)
    work = _work()
    a = ExecPlan("a", 1, 2, (0, 1))
    plans = [a, ExecPlan("b", 1, 1, (2,))]
    run_b = ctx.est.run("b", 1, 1, work["b"])
    # a kept and serving: b starts alone (factor 1)
    stage, _ = run_stage(ctx, PlanState(0.0, work, {"a": a}, {}), plans)
    assert stage.predicted_finish_s["b"] == pytest.approx(LOAD_S + run_b.total_s)
    assert stage.restarts == ["b"]
    # a kept but still 10 s from ready: its 2 replicas compete with b's start (factor 1 + 0.5·2)
    stage, _ = run_stage(ctx, PlanState(0.0, work, {"a": a}, {"a": 10.0}), plans)
    assert stage.predicted_finish_s["b"] == pytest.approx(2 * LOAD_S + run_b.total_s)
    run_a = ctx.est.run("a", 1, 2, work["a"], kept=True)
    assert stage.predicted_finish_s["a"] == pytest.approx(10.0 + run_a.total_s)


def test_option_prices_its_own_replicas_starting_together() -> None:
    ctx = _ctx(0.5)
    state = PlanState(0.0, _work())
    assert ctx.option(state, ("a", 1, 1)).warm_s == pytest.approx(LOAD_S)
    assert ctx.option(state, ("a", 1, 3)).warm_s == pytest.approx(LOAD_S * 2.0)
    assert _ctx(0.0).option(state, ("a", 1, 3)).warm_s == pytest.approx(LOAD_S)
