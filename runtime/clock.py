"""The runtime's clock, injected: what the executor reads the time from and sleeps with.

`SYSTEM` is the real one. Tests pass a clock they advance by hand, so waits measured in seconds
(the pause that coalesces arrivals, the backoff of an outcome that cannot be stored) take no real
time and happen exactly when the test says. Engine processes keep the real clock: their starts and
health polls are what is measured.
"""

from __future__ import annotations

import asyncio
import time
from typing import Iterable, Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (durations, deadlines)."""

    def time(self) -> float:
        """Wall-clock seconds since the epoch (event stamps)."""

    async def sleep(self, seconds: float) -> None:
        """Return after `seconds` on this clock."""


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM = SystemClock()


async def wait_event(clock: Clock, event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until `event` is set or `timeout_s` passed on `clock`; True when the event came first."""
    return await wait_events(clock, (event,), timeout_s)


async def wait_events(clock: Clock, events: Iterable[asyncio.Event], timeout_s: float) -> bool:
    """Wait until one of `events` is set or `timeout_s` passed on `clock`; True when an event
    came first."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    timer = asyncio.ensure_future(clock.sleep(timeout_s))
    try:
        await asyncio.wait((*waiters, timer), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        timer.cancel()
    return any(w.done() and not w.cancelled() for w in waiters)
