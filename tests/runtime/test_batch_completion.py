"""Each pooled batch's predicted completion in the executor's plan events (`batches_predicted_s`):
every open batch with requests left, never past the predicted makespan; and the makespan's lower
bound (`lower_bound_s`, `scheduler.bounds`), never above it; both computed where the planner runs
(its own process too), absent for planners that do not say."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from runtime.executor.executor import PoolExecutor
from runtime.executor.planner_process import ProcessPlanner
from scheduler.types import DevicePool, ExecPlan, Schedule, Stage

from .clocks import ManualClock
from .fakes import FakeLauncher
from .executor_kit import Sink, items, make_cfg

pytestmark = pytest.mark.timeout(90)


def plans(ex: PoolExecutor, batch: str) -> list[dict]:
    return [e for e in ex.events(batch) if e["event"] in ("plan", "replan")]


async def _pooled(tmp_path: Path, planner=None) -> PoolExecutor:
    # c still runs when a is done (a re-plan without x), even on a busy machine
    launcher = FakeLauncher(delay_s={"a": 0.01, "c": 0.2})
    cfg = make_cfg(tmp_path)
    ex = PoolExecutor(cfg, launcher, clock=ManualClock(auto=True),
                      pool=DevicePool("cpu", (0, 1, 2, 3), int(cfg.devices.cpu_kvcache_gib * 2**30)),
                      **({"planner": planner} if planner is not None else {}))
    await ex.start()
    try:
        # submitted together: one pool, planned in one pass
        ex.submit("x", items("a", 3), Sink())
        ex.submit("y", items("c", 24, prefix="y") + items("a", 4, prefix="y"), Sink())
        await asyncio.wait_for(asyncio.gather(ex.wait("x"), ex.wait("y")), 60)
    finally:
        await ex.close()
    return ex


async def test_every_open_batch_gets_its_predicted_completion(tmp_path) -> None:
    ex = await _pooled(tmp_path)
    first = plans(ex, "x")[0]
    assert first["event"] == "plan" and first == plans(ex, "y")[0]
    done = first["batches_predicted_s"]
    assert set(done) == {"x", "y"}
    assert all(0 < s <= first["predicted_makespan_s"] for s in done.values())
    # x (three short requests of the small model) is predicted done before y (c's long ones)
    assert done["x"] < done["y"] == pytest.approx(first["predicted_makespan_s"])
    after_a = 0
    for e in plans(ex, "y"):
        got = e["batches_predicted_s"]
        assert got and set(got) <= {"x", "y"}
        assert all(s <= e["predicted_makespan_s"] for s in got.values())
        assert 0 < e["lower_bound_s"] <= e["predicted_makespan_s"], e
        if sum(e["remaining"].values()) and "a" not in e["remaining"]:
            assert "x" not in got  # a batch with all its requests done is absent
            after_a += 1
    assert after_a, [e["remaining"] for e in plans(ex, "y")]


async def test_plan_events_carry_every_stage(tmp_path) -> None:
    """The status page draws the whole plan: each event lists every stage, the first as `stage`."""
    ex = await _pooled(tmp_path)
    for e in plans(ex, "y"):
        sched = e["schedule"]
        assert len(sched) == e["stages"] >= 1 and sched[0]["plans"] == e["stage"]
        assert all(0 <= st["start_s"] <= st["end_s"] <= e["predicted_makespan_s"] + 1e-3
                   for st in sched), sched
        assert sched[-1]["end_s"] == pytest.approx(e["predicted_makespan_s"], abs=1e-3)


async def test_a_planner_that_does_not_say_leaves_it_out(tmp_path) -> None:
    def scripted(problem, strategy):
        stage = Stage([ExecPlan(m, 1, 1, (i,)) for i, m in enumerate(sorted(problem.work))],
                      0.0, 1.0, sorted(problem.work))
        return Schedule(strategy, [stage], 1.0)

    ex = await _pooled(tmp_path, scripted)
    assert plans(ex, "x") and all("batches_predicted_s" not in e and "lower_bound_s" not in e
                                  for e in plans(ex, "x"))


async def test_computed_in_the_planners_own_process(tmp_path) -> None:
    planner = ProcessPlanner()
    try:
        ex = await _pooled(tmp_path, planner)
    finally:
        planner.close()
    first = plans(ex, "x")[0]
    assert set(first["batches_predicted_s"]) == {"x", "y"}
    assert max(first["batches_predicted_s"].values()) <= first["predicted_makespan_s"]
    assert 0 < first["lower_bound_s"] <= first["predicted_makespan_s"]


async def _behind_a_big_one(tmp_path: Path, fairness: str) -> dict[str, float]:
    """The first plan's predicted completions of a 3-request batch submitted with a 480-request one
    on the same model, in one pool (the big one first)."""
    cfg = make_cfg(tmp_path)
    cfg = dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler, fairness=fairness))
    ex = PoolExecutor(cfg, FakeLauncher(), clock=ManualClock(auto=True),
                      pool=DevicePool("cpu", (0,), int(cfg.devices.cpu_kvcache_gib * 2**30)))
    await ex.start()
    try:
        # long answers (as the planner sees them: the fake engine answers at once), so that the
        # big batch's run, not the engine's start, is most of the plan
        big = items("a", 480)
        for it in big:
            it.max_tokens = 1000
        ex.submit("big", big, Sink())
        ex.submit("small", items("a", 3, prefix="s"), Sink())
        await asyncio.wait_for(asyncio.gather(ex.wait("big"), ex.wait("small")), 60)
    finally:
        await ex.close()
    return plans(ex, "small")[0]["batches_predicted_s"]


async def test_fair_queues_predict_a_small_batch_done_long_before_the_big_one(tmp_path) -> None:
    """The engines serve the small batch first (`queues`), so the plan must predict it so: a
    planner that saw the requests in arrival order put its completion at the big one's (its ETA
    and its deadline check with it)."""
    fair = await _behind_a_big_one(tmp_path / "fair", "fair")
    assert fair["small"] < 0.25 * fair["big"], fair
    fifo = await _behind_a_big_one(tmp_path / "fifo", "fifo")
    assert fifo["small"] == pytest.approx(fifo["big"], rel=0.1), fifo
