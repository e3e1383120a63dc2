"""Per-request and per-batch predicted completion of a schedule (`scheduler.completion`): the
simulator's own finish times where the planner simulated, queue-position estimates on extrapolated
runs, the latest finish per group, and `plan` filling it in only when asked."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from scheduler.completion import CompletedSchedule, group_finish, queue_estimate
from scheduler.dag import split_replicas
from scheduler.planner import STRATEGIES, Planner, plan
from scheduler.simulator import simulate
from scheduler.stages import run_stage
from scheduler.types import SimRequest
from tests.scheduler.test_dag import SHAPES, problem as dag_problem
from tests.scheduler.test_planner import L7, L13, cpu_problem, cpu_spec, gpu_problem

A, B, C = cpu_spec("a", 2, 128), cpu_spec("b", 4, 256), cpu_spec("c", 8, 512)


def test_one_stage_one_model_gives_the_simulators_own_finish_times():
    p = cpu_problem([B], n=40, cores=2)
    planner = Planner(p)
    s = planner.plan("samullm")
    (stage,) = s.stages
    (pl,) = stage.plans
    got = planner.finish_times(s)["b"]
    est = planner.est
    reqs = sorted(p.work["b"], key=lambda r: r.rid)
    sims = [simulate(part, est.limits("b", pl.tp), est.latency("b", pl.tp))
            for part, _ in split_replicas(reqs, pl.dp, None) if part]
    ready = s.makespan_s - max(r.total_time_s for r in sims)  # the engine's start
    assert ready > 0
    want = {rid: ready + f for r in sims for rid, f in r.finish_times_s.items()}
    assert set(got) == {r.rid for r in reqs}
    for rid, f in want.items():
        assert got[rid] == pytest.approx(f, rel=1e-12, abs=1e-9)
    assert max(got.values()) == pytest.approx(s.makespan_s)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_finishes_each_request_in_the_stage_that_cuts_it(strategy):
    """Multi-stage, kept and restarted engines: a request's time lies in the stage after which the
    planner no longer has it, and the last one is the makespan."""
    p = cpu_problem([A, B, C], n=30)
    planner = Planner(p)
    s = planner.plan(strategy)
    got = planner.finish_times(s)
    assert max(f for v in got.values() for f in v.values()) == pytest.approx(s.makespan_s)
    if any(st.level is not None for st in s.stages):
        return
    ctx, state = planner.exact_ctx, planner.initial_state()
    for st in s.stages:
        before = {m: {r.rid for r in w.requests} for m, w in state.work.items()}
        stage, state = run_stage(ctx, state, st.plans, set(st.finished))
        for m, rids in before.items():
            left = {r.rid for r in state.work[m].requests} if m in state.work else set()
            for rid in rids - left:
                assert stage.start_s - 1e-9 <= got[m][rid] <= stage.end_s + 1e-9, (m, rid)
            for rid in left:
                assert got[m][rid] >= stage.end_s - 1e-9, (m, rid)


def test_a_groups_completion_is_the_latest_finish_of_its_requests():
    p = cpu_problem([A, B], n=20)
    planner = Planner(p)
    s = planner.plan("samullm")
    ft = planner.finish_times(s)
    groups = {m: {r.rid: ("odd" if r.rid % 2 else "even") for r in p.work[m]} for m in p.work}
    groups["a"].pop(3)  # a request without a group counts for none
    got = group_finish(ft, groups)
    for g in ("odd", "even"):
        assert got[g] == max(f for m in ft for rid, f in ft[m].items()
                             if groups[m].get(rid) == g)
    assert max(got.values()) == pytest.approx(s.makespan_s)


def test_plan_fills_in_group_completion_only_when_asked():
    """Two batches: `early` holds the small model's short requests, `late` the large model's
    long ones; the early batch is predicted done first, the late one at the makespan."""
    p = cpu_problem([A, C], n=1)
    p.work = {"a": [SimRequest(i, 20, 4) for i in range(12)],
              "c": [SimRequest(i, 200, 150) for i in range(12)]}
    plain = plan(p, "samullm")
    assert not isinstance(plain, CompletedSchedule)
    asked = plan(dataclasses.replace(p, groups={"a": {i: "early" for i in range(12)},
                                                "c": {i: "late" for i in range(12)}}))
    assert isinstance(asked, CompletedSchedule)
    assert asked.makespan_s == plain.makespan_s and len(asked.stages) == len(plain.stages)
    done = asked.group_finish_s
    assert done["early"] < done["late"] == pytest.approx(asked.makespan_s)


def test_the_batch_first_in_one_engines_queue_finishes_first():
    p = cpu_problem([B], n=1, cores=1)
    p.work = {"b": [SimRequest(i, 50, 40) for i in range(60)]}
    groups = {"b": {i: "first" if i < 30 else "second" for i in range(60)}}
    s = plan(dataclasses.replace(p, groups=groups))
    assert s.group_finish_s["first"] < s.group_finish_s["second"] == pytest.approx(s.makespan_s)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_dependent_requests_finish_after_their_upstream_ones(shape):
    p = dag_problem(SHAPES[shape]())
    planner = Planner(p)
    for name in ("samullm", "sequential", "level-by-level"):
        s = planner.plan(name)
        got = planner.finish_times(s)
        assert max(f for v in got.values() for f in v.values()) == pytest.approx(s.makespan_s)
        for m, reqs in p.work.items():
            for r in reqs:
                for u, rid in r.upstream:
                    assert got[m][r.rid] >= got[u][rid] - 1e-9, (name, m, r.rid)


def test_extrapolated_runs_estimate_by_queue_position_monotone_and_bounded():
    p = gpu_problem([L7], n=3000)
    planner = Planner(p)
    s = planner.plan("samullm")
    (stage,) = s.stages
    (pl,) = stage.plans
    work = planner.initial_state().work["m7b"]
    assert planner.est.run("m7b", pl.tp, pl.dp, work).order is None  # read off the fitted line
    got = planner.finish_times(s)["m7b"]
    assert len(got) == 3000 and max(got.values()) == pytest.approx(s.makespan_s)
    ready = stage.start_s + s.makespan_s - planner.est.run("m7b", pl.tp, pl.dp, work).total_s
    for part, _ in split_replicas(work.requests, pl.dp, None):
        times = [got[r.rid] for r in part]
        assert all(a <= b for a, b in zip(times, times[1:]))  # FCFS: in queue order
        assert ready - 1e-9 <= times[0] and times[-1] <= s.makespan_s + 1e-9
        assert times[len(times) // 2] < times[-1]  # spread over the run, not all at the end


def test_extrapolated_multi_stage_schedules_stay_within_each_models_finish():
    p = gpu_problem([L7, L13], n=3000)
    planner = Planner(p)
    for name in ("samullm", "sequential", "muxserve-greedy"):
        s = planner.plan(name)
        got = planner.finish_times(s)
        ends = {m: st.end_s for st in s.stages for m in st.finished}
        for m, times in got.items():
            assert len(times) == 3000
            assert max(times.values()) == pytest.approx(ends[m]), (name, m)
            assert min(times.values()) > 0


def test_queue_estimate_reads_the_curve_at_each_position():
    p = gpu_problem([L7], n=3000)
    planner = Planner(p)
    work = planner.initial_state().work["m7b"]
    run = planner.est.run("m7b", 1, 4, work)
    est = queue_estimate(work, 4, run)
    assert est.shape == (3000,) and np.all(est <= run.total_s + 1e-12)
    assert est.max() == pytest.approx(run.total_s)
    # round-robin: request k of replica r is request r + 4k; the k-th requests of all replicas
    # are at the same position of the curve
    assert est[0] == est[1] == est[2] == est[3] < est[4]
