"""Completion windows as deadlines (`runtime.executor.deadlines`): a batch predicted to miss its
window is moved up (its queues serve it first, the next plan orders it first) with a
`deadline_at_risk` event; still late when planned first, it is reported once
(`deadline_miss_predicted`); batches on time are left alone."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from runtime.executor.deadlines import Deadlines
from runtime.executor.executor import PoolExecutor
from runtime.executor.pool_state import Req
from runtime.executor.queues import ModelQueues
from scheduler.types import DevicePool

from .clocks import ManualClock
from .fakes import FakeLauncher
from .executor_kit import Sink, items, make_cfg

pytestmark = pytest.mark.timeout(90)


def test_late_batches_are_moved_up_then_reported_once() -> None:
    d = Deadlines()
    d.add("late", 100.0)
    d.add("fine", 500.0)
    d.add("never", None)
    got = d.check(0.0, 1, {"late": 150.0, "fine": 150.0, "never": 1e9})
    assert [(k, b) for k, b, _ in got] == [("deadline_at_risk", "late")]
    assert got[0][2]["late_s"] == 50.0 and got[0][2]["moved_up"] and d.urgent == {"late"}
    assert d.check(0.0, 1, {"late": 150.0}) == []  # the same plan: not planned first yet
    again = d.check(10.0, 2, {"late": 120.0})  # planned first, still late
    assert [(k, b) for k, b, _ in again] == [("deadline_miss_predicted", "late")]
    assert d.check(20.0, 3, {"late": 120.0}) == []  # once
    assert d.check(20.0, 4, {"late": 10.0}) == [] and d.urgent == {"late"}  # kept moved up
    d.forget("late")
    assert d.urgent == set() and "late" not in d.due


def test_the_planner_sees_urgent_batches_first() -> None:
    d = Deadlines()
    reqs = [Req(b, it) for b, it in [("a", x) for x in items("m", 2)]
            + [("b", x) for x in items("m", 2, prefix="b")]]
    assert d.first(reqs) == reqs
    d.urgent.add("b")
    assert [r.batch_id for r in d.first(reqs)] == ["b", "b", "a", "a"]


@pytest.mark.parametrize("fairness", ["fair", "fifo"])
def test_urgent_batches_are_served_before_the_turns(fairness: str) -> None:
    urgent: set[str] = set()
    q = ModelQueues(fairness, urgent)
    for batch, n in (("big", 10), ("late", 3)):
        for it in items("m", n, prefix=batch):
            q.push(Req(batch, it))
    urgent.add("late")
    assert [q.pop("m").batch_id for _ in range(5)] == ["late"] * 3 + ["big"] * 2


async def test_a_batch_that_cannot_make_its_window_is_moved_up_and_reported(tmp_path: Path) -> None:
    launcher = FakeLauncher(delay_s={"a": 0.02})
    cfg = make_cfg(tmp_path)  # arrival order: only being moved up puts `late` before `big`
    cfg = dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler, fairness="fifo"))
    clock = ManualClock(auto=True)
    ex = PoolExecutor(cfg, launcher, clock=clock,
                      pool=DevicePool("cpu", (0, 1), int(cfg.devices.cpu_kvcache_gib * 2**30)))
    await ex.start()
    log: list = []
    try:
        ex.submit("big", items("a", 40, prefix="big"), Sink(log, "big"))
        ex.submit("late", items("a", 4, prefix="late"), Sink(log, "late"),
                  deadline_at=clock.time() + 1e-3)  # no plan can finish it in time
        ex.submit("easy", items("a", 2, prefix="easy"), Sink(log, "easy"),
                  deadline_at=clock.time() + 1e6)
        await asyncio.wait_for(asyncio.gather(*(ex.wait(b) for b in ("big", "late", "easy"))), 60)
    finally:
        await ex.close()
    late = [e for e in ex.events("late") if e["event"].startswith("deadline")]
    assert late and late[0]["event"] == "deadline_at_risk" and late[0]["batch"] == "late"
    assert late[0]["late_s"] > 0
    assert not [e for e in ex.events("easy") if e["event"].startswith("deadline")]
    assert not [e for e in ex.events("big") if e["event"].startswith("deadline")]
    order = [b for b, _ in log]
    # served first once moved up: all of it before most of the big batch (without: after all 40)
    assert order.count("late") == 4
    assert max(i for i, b in enumerate(order) if b == "late") < len(order) // 2
