"""When the executor plans: arrivals paced into shared passes, small batches served at once
without a pass of their own, an idle gateway planning at once (`runtime/executor/passes.py`)."""

from __future__ import annotations

import asyncio

import pytest

from runtime.executor import passes as passes_mod

from .clocks import ManualClock
from .executor_kit import Sink, items

pytestmark = pytest.mark.timeout(60)


async def test_a_stream_of_new_batches_is_planned_in_few_passes(run, launcher) -> None:
    """Arrivals alone wait for ARRIVAL_PASS_INTERVAL_S after the last pass and share one pass (the
    executor's clock moves only when told: nothing is planned for them before it does)."""
    launcher.delay_s["a"] = 0.05
    clock = ManualClock()
    ex = await run(devices=1, clock=clock)
    ex.submit("first", items("a", 300), Sink())  # ~2.5 s of work: in the pool throughout
    while not launcher.posts:
        await asyncio.sleep(0.005)
    sinks = []
    for i in range(20):  # 8 requests: not small on 4 seats (a small one gets no pass at all)
        ex.submit(f"s{i}", items("a", 8, prefix=f"s{i}"), sink := Sink())
        sinks.append(sink)
    await asyncio.sleep(0.1)

    def plans() -> list[dict]:
        return [e for e in ex.events("first") if e["event"] in ("plan", "replan")]
    assert len(plans()) == 1 and clock.sleeping == 1  # the control task waits out the pause
    await clock.advance(passes_mod.ARRIVAL_PASS_INTERVAL_S)
    while len(plans()) < 2:
        await asyncio.sleep(0.005)
    assert sorted(plans()[1]["reasons"]) == sorted(f"batch_submitted:s{i}" for i in range(20))
    await asyncio.wait_for(asyncio.gather(*(ex.wait(f"s{i}") for i in range(20))), 30)
    assert all(len(s.outcomes) == 8 and all(o.ok for o in s.outcomes) for s in sinks)
    await ex.wait("first")
    assert len(plans()) == 2


async def test_a_small_batch_served_at_once_gets_no_pass_of_its_own(run, launcher) -> None:
    """A small batch of a model whose engine is up is served without a plan (the seats' hold);
    a pass for it only took the CPU it was served on (the fairness bench's s6, 5 Dec 2026). Its
    pass waits while it is served, and is dropped once it is done (the plan is as it was)."""
    launcher.delay_s["a"] = 0.05
    clock = ManualClock()
    ex = await run(devices=1, clock=clock)
    ex.submit("first", items("a", 300), Sink())  # in the pool throughout
    while not launcher.posts:
        await asyncio.sleep(0.005)
    ex.submit("small", items("a", 2, prefix="s"), sink := Sink())
    await asyncio.wait_for(ex.wait("small"), 10)  # served, the manual clock still
    assert len(sink.outcomes) == 2 and all(o.ok for o in sink.outcomes)
    await clock.advance(passes_mod.ARRIVAL_PASS_INTERVAL_S + passes_mod.SMALL_ARRIVAL_WAIT_S)
    await asyncio.sleep(0.1)
    plans = [e for e in ex.events("first") if e["event"] in ("plan", "replan")]
    assert len(plans) == 1, [p["reasons"] for p in plans]


async def test_a_small_batch_still_served_after_the_wait_is_planned(run, launcher) -> None:
    """The wait for a small batch served at once is bounded: one still running after
    SMALL_ARRIVAL_WAIT_S gets its pass; so does one whose model has no engine up."""
    launcher.delay_s.update(a=3.0, b=0.01)  # real seconds: the advances below take about 1 s
    clock = ManualClock()
    ex = await run(devices=1, clock=clock)
    ex.submit("first", items("a", 300), Sink())
    while not launcher.posts:
        await asyncio.sleep(0.005)

    def reasons() -> list[list[str]]:
        return [e["reasons"] for e in ex.events("first") if e["event"] in ("plan", "replan")]
    ex.submit("small", items("a", 2, prefix="s"), Sink())
    await asyncio.sleep(0.02)
    await clock.advance(passes_mod.ARRIVAL_PASS_INTERVAL_S)
    assert len(reasons()) == 1  # waiting while it is served
    await clock.advance(passes_mod.SMALL_ARRIVAL_WAIT_S)
    while len(reasons()) < 2:
        await asyncio.sleep(0.005)
    assert reasons()[1] == ["batch_submitted:small"] and not ex._batches["small"].finished.is_set()
    ex.submit("other", items("b", 2, prefix="o"), Sink())  # b: no engine up, the pass plans one
    await asyncio.sleep(0.02)
    await clock.advance(passes_mod.ARRIVAL_PASS_INTERVAL_S)
    while len(reasons()) < 3:
        await asyncio.sleep(0.005)
    assert reasons()[2] == ["batch_submitted:other"]


async def test_a_batch_after_an_idle_spell_is_planned_at_once(run, launcher) -> None:
    """The arrival pause spares a busy gateway back-to-back passes; with nothing in flight there is
    nothing to spare, and a batch sent right after the last one completed is planned at once (the
    bench sent batch 2 0.1 s after batch 1 ended: its plan came 0.9 s later, its ETA was late)."""
    clock = ManualClock()
    ex = await run(devices=1, clock=clock)
    ex.submit("first", items("a", 3), Sink())
    await asyncio.wait_for(ex.wait("first"), 10)
    await asyncio.sleep(0.3)  # the pass after the pool finished has run (the manual clock is still)
    ex.submit("second", items("b", 3), sink := Sink())  # b has no engine: it needs a pass
    await asyncio.wait_for(ex.wait("second"), 10)  # the manual clock never moved
    assert len(sink.outcomes) == 3
