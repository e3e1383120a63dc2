"""What the executor tells the planner beside the work: how much of a start an engine still owes
(a start in a spare process or not), which engines idle where after their model finished, and
how long a stop takes (`runtime.executor.planning.plan_problem`)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from runtime.executor import executor as executor_mod
from runtime.executor.executor import PoolExecutor
from runtime.executor.latency_source import DEFAULT_CPU_LOAD_S, DEFAULT_STOP_S
from scheduler.types import DevicePool

from .clocks import ManualClock
from .executor_kit import Sink, items, make_cfg


async def warmups_of_a_replan_during_a_start(launcher, tmp_path) -> list[dict]:
    """`PlanningProblem.warmup` of each plan when a batch arrives while the first one's engine
    starts (0.5 s: the re-plan comes during it)."""
    seen: list[dict] = []

    def recording(problem, strategy):
        seen.append(dict(problem.warmup))
        return executor_mod.plan(problem, strategy)

    launcher.start_delay_s = 0.5
    ex = PoolExecutor(make_cfg(tmp_path), launcher, planner=recording, clock=ManualClock(auto=True),
                      pool=DevicePool("cpu", (0, 1), int(0.25 * 2**30)))
    await ex.start()
    try:
        ex.submit("x", items("a", 4), Sink())
        while not seen:
            await asyncio.sleep(0.005)
        ex.submit("y", items("a", 2, prefix="y"), Sink())  # re-plans while a's engine starts
        await asyncio.wait_for(asyncio.gather(ex.wait("x"), ex.wait("y")), 30)
    finally:
        await ex.close()
    return seen


async def test_a_replan_during_an_engine_start_knows_the_start_is_not_over(run, launcher,
                                                                          tmp_path) -> None:
    """The planner is told what a starting engine still owes of its start (else it prices it as
    serving now and leaves devices idle waiting for it)."""
    seen = await warmups_of_a_replan_during_a_start(launcher, tmp_path)
    assert seen[0] == {}  # nothing started yet
    assert seen[1]["a"] > 1.0  # the default CPU start (25 s) minus the little time gone by


class NoReadySpares:
    """A spare pool (`runtime.engines.spares.SparePool`'s planner side) whose spares all import."""

    size = 1

    def import_left(self) -> tuple[float, ...]:
        return (7.0,)

    def import_s(self) -> float:
        return 7.0

    def ready_count(self) -> int:
        return 0

    def forks_ready(self) -> bool:  # the zygote still imports
        return False


async def test_a_replan_knows_a_start_that_found_no_spare_takes_the_import_longer(
        run, launcher, tmp_path) -> None:
    """An engine started without a ready spare imports vLLM's API server first: a re-plan during
    its start must expect that (fresh bench, batch 2: such a start took 21.1 s, and the re-plans
    during it expected the 14.5 s of a start in a spare)."""
    launcher.spares = NoReadySpares()
    seen = await warmups_of_a_replan_during_a_start(launcher, tmp_path)
    assert seen[1]["a"] > DEFAULT_CPU_LOAD_S + 7.0 - 1.0  # a spare's start plus the import


async def test_the_planner_is_told_the_idle_engines_and_what_a_stop_takes(launcher,
                                                                        tmp_path) -> None:
    """An engine kept warm after its model's work is up (idle), and starts wait for stops: the
    planner is told which engines idle where, and the stop time measured (a default before any)."""
    seen: list[Any] = []

    def recording(problem, strategy):
        seen.append(problem)
        return executor_mod.plan(problem, strategy)

    launcher.stop_delay_s = 0.3  # real time: the stop is measured on the system clock
    ex = PoolExecutor(make_cfg(tmp_path), launcher, planner=recording,
                      pool=DevicePool("cpu", (0,), int(0.25 * 2**30)))
    await ex.start()
    try:
        ex.submit("x", items("a", 2), Sink())
        await asyncio.wait_for(ex.wait("x"), 30)
        await asyncio.sleep(0.2)  # a's engine idles (kept warm) on the only core
        ex.submit("y", items("b", 2), Sink())  # b's engine needs the core: a's engine stops
        await asyncio.wait_for(ex.wait("y"), 30)
        ex.submit("z", items("a", 2, prefix="z"), Sink())
        await asyncio.wait_for(ex.wait("z"), 30)
    finally:
        await ex.close()
    assert seen[0].idle == {} and seen[0].stop_s == DEFAULT_STOP_S
    assert set(seen[1].idle) == {"a"} and seen[1].idle["a"].devices == (0,)
    assert set(seen[2].idle) == {"b"} and 0.3 <= seen[2].stop_s < 0.3 + 0.5 * DEFAULT_STOP_S
    # a restarted gateway plans with the stop it measured, not the default (it was kept in
    # memory only: a restart priced every stop at 1.0 s where 0.36 s had been measured)
    measured = seen[2].stop_s
    again = PoolExecutor(make_cfg(tmp_path), launcher, planner=recording,
                         pool=DevicePool("cpu", (0,), int(0.25 * 2**30)))
    await again.start()
    try:
        again.submit("w", items("a", 2, prefix="w"), Sink())
        await asyncio.wait_for(again.wait("w"), 30)
    finally:
        await again.close()
    assert seen[3].stop_s == pytest.approx(measured, abs=1e-3)
