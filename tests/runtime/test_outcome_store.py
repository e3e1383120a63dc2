"""Outcomes that cannot be made durable (a full disk): dispatch pauses, the outcome is retried
until stored, each custom_id exactly once; cancel and close do not wait for the disk
(`runtime/executor/outcome_store.py`)."""

from __future__ import annotations

import asyncio

import pytest

from runtime.executor import outcome_store
from runtime.executor_api import Outcome

from .clocks import ManualClock
from .executor_kit import Sink, items, kinds

pytestmark = pytest.mark.timeout(60)


class FullDiskSink(Sink):
    """A journal on a disk that is full until `free()`: every append raises ENOSPC."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False
        self.refused = 0

    async def __call__(self, outcome: Outcome) -> None:
        if self.full:
            self.refused += 1
            raise OSError(28, "No space left on device")
        await super().__call__(outcome)


async def test_a_result_that_cannot_be_made_durable_pauses_the_batch(run, launcher) -> None:
    """Issue 12, item 1: a sink that raises (ENOSPC) does not count the request; dispatch pauses
    while results cannot be stored and resumes when space returns; each custom_id exactly once."""
    launcher.delay_s.update(a=0.02)
    clock = ManualClock()
    ex = await run(clock=clock)
    ex.submit("x", items("a", 80), sink := FullDiskSink())
    while len(sink.outcomes) < 5:
        await asyncio.sleep(0.005)
    sink.full = True
    while sink.refused == 0:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.2)  # what the engines held is answered; nothing new is sent meanwhile
    sent, refused = len(launcher.posts), sink.refused
    await clock.advance(outcome_store.STORE_RETRY_S[0] * 0.9)
    assert sink.refused == refused, "retried before its backoff"
    await clock.advance(30.0)  # backoff 0.1, 0.2, ... 2 s: about 20 attempts per stalled outcome
    assert sink.refused > refused, "never retried"
    assert len(launcher.posts) == sent, "requests were dispatched while results could not be stored"
    assert not ex._batches["x"].finished.is_set()
    sink.full = False
    await clock.advance(outcome_store.STORE_RETRY_S[1])
    await asyncio.wait_for(ex.wait("x"), 30)
    got = sink.by_id()
    assert set(got) == {f"a-{i}" for i in range(80)} and all(o.ok for o in got.values())
    ev = kinds(ex.events("x"))
    assert "storage_stalled" in ev and "storage_resumed" in ev


async def test_cancel_and_close_do_not_wait_for_a_full_disk(run, launcher) -> None:
    launcher.delay_s.update(a=0.02)
    ex = await run()
    ex.submit("x", items("a", 40), sink := FullDiskSink())
    ex.submit("y", items("a", 40, prefix="y"), sink_y := FullDiskSink())
    while len(sink.outcomes) < 3:
        await asyncio.sleep(0.005)
    sink.full = sink_y.full = True
    while sink.refused == 0:
        await asyncio.sleep(0.005)
    await asyncio.wait_for(ex.cancel("x"), 5)  # its undurable outcomes are dropped, not awaited
    await asyncio.wait_for(ex.close(), 10)  # y's are given up too: they re-run after a restart
