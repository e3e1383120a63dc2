"""Warm engines between batches (`[devices] engine_linger_s`): an engine whose model ran out of work
stays up for the next batch of its model, is freed at once when a plan needs its devices, and stops
when its linger time is up (on the executor's clock, driven by the test)."""

from __future__ import annotations

import asyncio

import pytest

from .clocks import ManualClock
from .executor_kit import Sink, items, kinds

pytestmark = pytest.mark.timeout(60)


async def idle(ex) -> None:
    """Until the pass after the batch's last outcome has marked its engine idle (a loaded machine
    may take a while)."""
    for _ in range(500):
        if ex.health()["idle_engines"]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no engine became idle")


async def warm_after_a_batch(run, launcher) -> tuple:
    """An executor on one core whose engine for `a` ran a batch and is now kept warm."""
    clock = ManualClock()
    ex = await run(devices=1, clock=clock)
    ex.submit("first", items("a", 5), Sink())
    await asyncio.wait_for(ex.wait("first"), 30)
    await idle(ex)
    assert len(launcher.alive("a")) == 1  # kept warm
    return ex, clock


async def test_the_next_batch_of_a_model_finds_its_engine_warm(run, launcher) -> None:
    ex, clock = await warm_after_a_batch(run, launcher)
    health = ex.health()["idle_engines"]
    assert [(e["model"], e["devices"]) for e in health] == [("a", [0])]
    await clock.advance(60)
    ex.submit("second", items("a", 5, prefix="s"), second := Sink())
    await clock.advance(2)  # past the arrival pause (a new pool waits for its pass)
    await asyncio.wait_for(ex.wait("second"), 30)
    assert len(second.by_id()) == 5 and len(launcher.engines) == 1  # no new start
    assert "engine_start" not in kinds(ex.events("second"))
    await idle(ex)
    await clock.advance(ex.cfg.devices.engine_linger_s - 1)
    assert len(launcher.alive("a")) == 1  # idle again since the second batch: not yet
    await clock.advance(2)
    for _ in range(500):  # its stop is a pass away (1 s was too short once, in a full run)
        if not launcher.alive():
            break
        await asyncio.sleep(0.01)
    assert launcher.alive() == [] and ex.health()["idle_engines"] == []


async def test_a_warm_engine_gives_its_devices_up_at_once(run, launcher) -> None:
    ex, clock = await warm_after_a_batch(run, launcher)
    ex.submit("other", items("b", 3, prefix="o"), other := Sink())  # b needs core 0
    await clock.advance(2)  # past the arrival pause
    await asyncio.wait_for(ex.wait("other"), 30)
    assert len(other.by_id()) == 3
    assert launcher.alive("a") == []  # stopped for b (the fixture checks no device was shared)


async def test_metrics_count_the_warm_engines(tmp_path) -> None:
    from gateway.metrics import GatewayMetrics
    gm = GatewayMetrics()
    idle = [1, 2]
    gm.bind(lambda: {}, lambda: 0, lambda: len(idle))
    assert b"samullm_idle_engines 2.0" in gm.render()
