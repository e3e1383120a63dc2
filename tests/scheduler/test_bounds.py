"""The makespan lower bound (`scheduler.bounds`): hand-computed on costs and on the planner's own
runs under a stub latency (one iteration costs c0, so k output tokens take k·c0), never above a
strategy's predicted makespan, for dependent requests too, and carried by `plan` when asked."""

from __future__ import annotations

import pytest

from scheduler.bounds import LowerBound, ShapeCost, lower_bound
from scheduler.latency import LatencyModel
from scheduler.planner import STRATEGIES, Planner, PlanningProblem, plan
from scheduler.types import DevicePool, ExecPlan, SimRequest
from tests.scheduler.test_dag import SHAPES, problem as dag_problem
from tests.scheduler.test_planner import GiB, cpu_problem, cpu_spec

LOAD = {1: 5.0, 2: 6.0}  # engine start per TP degree


def stub_latency(c0: dict[int, float]):
    """Per TP degree: each iteration costs c0[tp] and nothing else; loads from LOAD."""
    return lambda spec, tp: LatencyModel(c0[tp], 0, 0, 0, 0, load_time_s=LOAD[tp])


def two_core_problem(outputs: dict[str, int], c0: dict[int, float], **kw) -> PlanningProblem:
    """Four requests per model, all of `outputs[model]` tokens (one batch: k iterations)."""
    models = {m: cpu_spec(m, 2, 128) for m in outputs}
    work = {m: [SimRequest(i, 10, n) for i in range(4)] for m, n in outputs.items()}
    return PlanningProblem(models, work, DevicePool("cpu", (0, 1), GiB), stub_latency(c0),
                           lambda s, tp: GiB // 4, **kw)


def test_bound_of_costs_is_the_larger_term_plus_the_least_start():
    one = {"a": [ShapeCost(1, 4.0, 5.0), ShapeCost(2, 3.0, 6.0)]}
    # solo: a's least start (5) + its least run (3)
    assert lower_bound(one, 2) == LowerBound(3.0, 2.0, 5.0, 8.0)
    assert lower_bound(one, 2).value_s == 8.0
    two = {"a": [ShapeCost(1, 4.0, 5.0), ShapeCost(2, 3.0, 6.0)],
           "b": [ShapeCost(1, 2.0, 7.0), ShapeCost(2, 1.5, 0.0)]}
    # area: (min(4, 6) + min(2, 3)) / 2 = 3 = alone; b's engine serves now: no start, but a
    # must still start its own (solo: 5 + 3 = 8 > area + start = 3)
    assert lower_bound(two, 2) == LowerBound(3.0, 3.0, 0.0, 8.0)
    assert lower_bound(two, 2).value_s == 8.0
    assert lower_bound({}, 4).value_s == 0.0
    with pytest.raises(ValueError):
        lower_bound({"a": []}, 2)


def test_one_model_whose_best_shape_uses_all_devices():
    # TP1 10 × 0.1 = 1.0 s (1.0 device-s), TP1×DP2 1.0 s (2.0), TP2 10 × 0.08 = 0.8 s (1.6)
    p = two_core_problem({"a": 10}, {1: 0.1, 2: 0.08})
    b = Planner(p).lower_bound()
    assert (b.alone_s, b.area_s, b.start_s) == pytest.approx((0.8, 0.5, 5.0))
    assert b.value_s == pytest.approx(5.8)
    assert Planner(p).plan("samullm").makespan_s >= b.value_s


def test_two_models_bounded_by_their_device_seconds():
    # each: TP1 20 × 0.1 = 2.0 s (2.0 device-s), TP2 20 × 0.07 = 1.4 s (2.8): alone 1.4,
    # area (2.0 + 2.0) / 2 = 2.0
    p = two_core_problem({"a": 20, "b": 20}, {1: 0.1, 2: 0.07})
    b = Planner(p).lower_bound()
    assert (b.alone_s, b.area_s, b.start_s) == pytest.approx((1.4, 2.0, 5.0))
    assert b.value_s == pytest.approx(7.0)
    planner = Planner(p)
    for s in STRATEGIES:
        assert planner.plan(s).makespan_s >= b.value_s - 1e-9, s


def test_a_warm_engine_starts_nothing_and_spares_are_priced_ready():
    warm = two_core_problem({"a": 10, "b": 30}, {1: 0.1, 2: 0.08},
                            running={"a": ExecPlan("a", 1, 1, (0,))})
    assert Planner(warm).lower_bound().start_s == 0.0
    # ... but b still has to start: its least start + least run (30 × 0.08 = 2.4 s)
    assert Planner(warm).lower_bound().value_s >= 5.0 + 2.4 - 1e-9
    for s in STRATEGIES:
        assert Planner(warm).plan(s).makespan_s >= Planner(warm).lower_bound().value_s - 1e-9, s
    # no spare ready: the planner charges the import, the bound does not (a ready one could be)
    cold = two_core_problem({"a": 10}, {1: 0.1, 2: 0.08}, spares=(4.0,), no_spare_s=7.0)
    assert Planner(cold).lower_bound().start_s == 5.0
    assert Planner(cold).plan("samullm").makespan_s >= 5.0 + 7.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_strategy_is_predicted_below_the_bound(seed):
    A, B, C = cpu_spec("a", 2, 128), cpu_spec("b", 4, 256), cpu_spec("c", 8, 512)
    planner = Planner(cpu_problem([A, B, C], n=30, seed=seed, cores=2))
    bound = planner.lower_bound().value_s
    assert bound > 0
    for s in STRATEGIES:
        assert planner.plan(s).makespan_s >= bound * (1 - 1e-9), s


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_dependent_requests_are_bounded_too(shape):
    planner = Planner(dag_problem(SHAPES[shape](), cores=2))
    bound = planner.lower_bound().value_s
    assert bound > 0
    for s in STRATEGIES:
        assert planner.plan(s).makespan_s >= bound * (1 - 1e-9), (shape, s)


def test_plan_carries_the_bound_only_when_asked():
    p = two_core_problem({"a": 20, "b": 20}, {1: 0.1, 2: 0.07})
    assert getattr(plan(p), "lower_bound_s", None) is None
    p.lower_bound = True
    got = plan(p)
    assert got.lower_bound_s == pytest.approx(7.0)
    assert got.lower_bound_s <= got.makespan_s
