"""A clock for executor tests (`runtime.clock.Clock`): time moves only when the test says so.

`ManualClock()` holds every sleeper until `advance()` moves the time past its deadline, so a test
sees exactly what happens before and after a wait of the executor (the arrival pause, the backoff of
an outcome that cannot be stored). `ManualClock(auto=True)` lets each sleep return at once, moving
the time by its length: waits cost no real time and the test does not have to drive them.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools


class ManualClock:
    def __init__(self, start: float = 1000.0, *, auto: bool = False) -> None:
        self.now = start
        self.auto = auto
        self._sleepers: list[tuple[float, int, asyncio.Future]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1.7e9 + self.now

    async def sleep(self, seconds: float) -> None:
        if self.auto or seconds <= 0:
            self.now += max(0.0, seconds)
            await asyncio.sleep(0)
            return
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._seq), fut))
        await fut

    @property
    def sleeping(self) -> int:
        return sum(not f.done() for _, _, f in self._sleepers)

    async def advance(self, seconds: float, settle_s: float = 0.01) -> None:
        """Move the time forward by `seconds`, waking sleepers in deadline order; after each wake,
        give the woken tasks `settle_s` of real time to run (they may sleep again, and those new
        sleepers are woken too if their deadline falls within the advance)."""
        target = self.now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._sleepers)
            if fut.done():  # its sleeper was cancelled
                continue
            self.now = max(self.now, deadline)
            fut.set_result(None)
            await asyncio.sleep(settle_s)
        self.now = target
        await asyncio.sleep(settle_s)
