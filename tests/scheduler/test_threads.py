"""CPU ranks on several cores (threads): shapes, placement, pricing with a threads latency, and the
planner's choice between one engine on all cores and one engine per core."""

from __future__ import annotations

import dataclasses

import pytest

from scheduler.latency import LatencyModel, analytic_latency_model, assumed_threads_latency
from scheduler.placement import place, shape_devices, unpack
from scheduler.planner import Planner, PlanningProblem
from scheduler.types import DevicePool, ExecPlan, ModelSpec, SimRequest

GiB = 1 << 30
# one attention head: TP=2 is invalid, so the choice is one core, two engines or two threads
SPEC = ModelSpec("small", 4, 256, 1, 1, 1024, 2048, dtype_bytes=4, max_model_len=1024,
                 max_num_seqs=32, max_num_batched_tokens=1024)


def lat(spec: ModelSpec, tp: int) -> LatencyModel:
    return dataclasses.replace(analytic_latency_model(spec, tp, "cpu"), load_time_s=25.0)


def planner(speedup: float | None, n: int = 96, out: int = 8, beta: float = 0.3,
            max_threads: int = 2) -> Planner:
    pool = DevicePool("cpu", (0, 1), GiB // 4, start_contention=beta, max_threads=max_threads)
    work = {"small": [SimRequest(i, 100, out) for i in range(n)]}

    def threads_latency(spec: ModelSpec, tp: int, threads: int) -> LatencyModel:
        base = lat(spec, tp)
        assert threads == 2
        return dataclasses.replace(base, **{c: getattr(base, c) / speedup
                                            for c in ("c0", "c1", "c2", "c3", "c4")})

    return Planner(PlanningProblem({"small": SPEC}, work, pool, lat, lambda s, tp: GiB // 4,
                                   threads_latency=threads_latency if speedup else None))


def test_exec_plan_replicas_and_placement_with_threads() -> None:
    p = ExecPlan("m", 2, 2, tuple(range(8)), threads=2)
    assert p.width == 4 and p.num_devices == 8
    assert p.replicas() == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert not p.same_shape(ExecPlan("m", 2, 2, tuple(range(8))))
    pool = DevicePool("cpu", tuple(range(4)), GiB)
    (a, b) = place([("a", 1, 1, 2), ("b", 1, 2)], pool)
    assert (a.threads, a.devices, b.threads, b.devices) == (2, (0, 1), 1, (2, 3))
    assert place([("a", 1, 1, 4), ("b", 1, 1)], pool) is None
    assert shape_devices(("a", 2, 3, 2)) == 12 and unpack(("a", 2, 3)) == ("a", 2, 3, 1)


def test_threads_shapes_only_on_cpu_pools_that_allow_them() -> None:
    assert ("small", 1, 1, 2) in planner(None).ctx.shapes("small")
    assert all(len(s) == 3 for s in planner(None, max_threads=1).ctx.shapes("small"))
    gpu = DevicePool("a100", (0, 1), 80 * GiB, max_threads=2)
    p = Planner(PlanningProblem({"small": SPEC}, {"small": [SimRequest(0, 10, 10)]}, gpu, lat,
                                lambda s, tp: GiB))
    assert all(len(s) == 3 for s in p.ctx.shapes("small"))


def test_picks_one_engine_on_both_cores_when_its_profile_is_faster_and_starts_cost() -> None:
    """Short decoding, β > 0: one start beats two; threads = 2 at 1.8× beats TP=2 and one core."""
    p = planner(1.8)
    plans = p.plan("samullm").stages[0].plans
    assert [(q.tp, q.dp, q.threads, q.devices) for q in plans] == [(1, 1, 2, (0, 1))]
    run = p.est.run(p.est.variant("small", 2), 1, 1, p.initial_state().work["small"])
    assert p.plan("samullm").makespan_s == pytest.approx(25.0 + run.total_s)


def test_a_threads_shape_is_priced_its_own_start() -> None:
    """On CPU a rank on several cores starts slower than one on one core (its engine processes are
    spawned, not forked: `runtime.engines.api_server`): the threads latency's load time is that
    shape's start, in the options and in the schedule, so a slow start outweighs a faster rank."""
    pool = DevicePool("cpu", (0, 1), GiB // 4, start_contention=0.0, max_threads=2)
    work = {"small": [SimRequest(i, 100, 8) for i in range(96)]}

    def threads_latency(spec: ModelSpec, tp: int, threads: int) -> LatencyModel:
        base = dataclasses.replace(lat(spec, tp), load_time_s=3.5)
        return dataclasses.replace(base, load_time_s=16.5,
                                   **{c: getattr(base, c) / 1.8 for c in ("c0", "c1", "c2", "c3", "c4")})

    def fast_start(spec: ModelSpec, tp: int) -> LatencyModel:
        return dataclasses.replace(lat(spec, tp), load_time_s=3.5)

    p = Planner(PlanningProblem({"small": SPEC}, work, pool, fast_start, lambda s, tp: GiB // 4,
                                threads_latency=threads_latency))
    state = p.initial_state()
    assert p.ctx.option(state, ("small", 1, 1, 2)).warm_s == pytest.approx(16.5)
    assert p.ctx.option(state, ("small", 1, 1)).warm_s == pytest.approx(3.5)
    plans = p.plan("samullm").stages[0].plans
    assert all(q.threads == 1 for q in plans)


def test_threads_not_chosen_when_no_faster() -> None:
    plans = planner(1.0).plan("samullm").stages[0].plans
    assert all(q.threads == 1 for q in plans)


def test_long_decoding_still_prefers_two_engines_over_the_assumed_speedup() -> None:
    plans = planner(None, n=512, out=512).plan("samullm").stages[0].plans
    assert [(q.tp, q.dp, q.threads) for q in plans] == [(1, 2, 1)]


def test_assumed_threads_speed_the_gemms_up_and_the_fixed_costs_down() -> None:
    """Two cores per rank, unprofiled: the demo medium's decode step (GEMMs weigh most) runs
    faster, tiny-a's (fixed per-step costs weigh most) about as fast, as their profiles of 5 Dec
    showed at this step (medium 1.16x, small 1.11x, tiny-a 1.23x: on those the exponents fitted
    there give 1.20x and 1.00x; on the roofline 1.27x and 0.98x); the start is the same."""
    def demo(name: str, layers: int, hidden: int, heads: int, kv: int) -> ModelSpec:
        return ModelSpec(name, layers, hidden, heads, kv, 4 * hidden, 2048, dtype_bytes=4,
                         max_model_len=1024, max_num_seqs=32, max_num_batched_tokens=1024)

    decode = (32, 0.0, 32 * 256, 32)
    for spec, lo, hi in ((demo("medium", 8, 512, 8, 2), 1.1, 1.4),
                         (demo("tiny-a", 2, 128, 2, 1), 0.85, 1.1)):
        base = lat(spec, 1)
        two = assumed_threads_latency(base, spec, 1, 2)
        assert lo < base.iteration_time(*decode) / two.iteration_time(*decode) < hi, spec.name
        assert two.load_time_s == base.load_time_s
        assert assumed_threads_latency(base, spec, 1, 1) is base
