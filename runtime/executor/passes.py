"""The executor's passes: the reasons one is asked for, when the control task runs it, who waits.

Every event that may change the plan asks for a pass with a reason (`Passes.ask`: "engine_failed:a",
"batch_submitted:b", ...); the control task (`PoolExecutor._control_loop`) takes all the reasons
asked for so far at once (`Passes.next`), so events that come together share one pass, and the
futures `ask` returned resolve when that pass ends (`Passes.done`).

Arrivals are paced. New batches alone (and dependents released for a model without an engine) do
not need a pass at once while engines serve: their requests for running models are dispatched
already, and a stream of small batches would otherwise keep the planner busy back to back and
starve the gateway of CPU. So such a pass waits until ARRIVAL_PASS_INTERVAL_S after the last one
ended, and arrivals meanwhile join it. Engine events and model finishes never wait, nor does a batch
that finds nothing in flight (there is no busy gateway to spare, and its ETA starts with its plan).

A pass only for small batches that running engines serve at once (`PassHost.served_at_once`: the
seats' hold, or a guest) waits for them, at most SMALL_ARRIVAL_WAIT_S, and is dropped when they
are all done (`Passes.needed`): the plan is what it was before them. The pass for such a batch
only took the CPU it ran on: in the fairness bench a 0.42 s re-plan at s6's arrival ran while its
20 requests were served (0.48 s inside the gateway against 0.12 s alone, 5 Dec 2026).
"""

from __future__ import annotations

import asyncio
import math
from typing import Protocol

from runtime.clock import Clock, wait_events

ARRIVAL_PASS_INTERVAL_S = 1.0  # least time between the end of a pass and one for new batches only
SUBMITTED = "batch_submitted:"  # the reason a batch's arrival gives (`arrived`)
ARRIVALS = (SUBMITTED, "released:")  # pass reasons that may wait for that interval
# longest a pass for small batches that running engines serve at once waits for them to be done:
# what a 20-request batch takes on a busy engine (0.1-0.5 s; 1.4-3.3 s on `medium`, whose engine
# is held for it up to 5.3 s: `seats`), with room. At 2 s, a pass for one on `medium` planned
# (0.4 s of CPU) while it still ran (6 Dec 2026)
SMALL_ARRIVAL_WAIT_S = 6.0


class PassHost(Protocol):
    """What pacing asks of the executor."""

    def serving(self) -> bool:
        """Whether some engine has requests in flight."""

    def finished_event(self, batch_id: str) -> asyncio.Event | None:
        """The batch's finished event (None: the batch is forgotten)."""

    def served_at_once(self, batch_id: str) -> bool:
        """Whether running engines serve the batch without a plan (small, on engines up)."""


def arrived(reason: str) -> str | None:
    """The batch a pass reason is the arrival of, if it is one."""
    return reason[len(SUBMITTED):] if reason.startswith(SUBMITTED) else None


class Passes:
    """The reasons asked for since the last pass, and their waiters (see the module docstring)."""

    def __init__(self, clock: Clock, host: PassHost) -> None:
        self.clock = clock
        self.host = host
        self.reasons: list[str] = []
        self._waiters: list[asyncio.Future] = []
        self._wake = asyncio.Event()
        self._more = asyncio.Event()  # pulsed with `_wake`: a reason came while arrivals wait
        self._last_end = -math.inf

    def ask(self, reason: str) -> asyncio.Future:
        """Ask for a pass; the future resolves when a pass after now completed."""
        fut = asyncio.get_running_loop().create_future()
        self.reasons.append(reason)
        self._waiters.append(fut)
        self._wake.set()
        self._more.set()
        return fut

    async def next(self) -> tuple[list[str], list[asyncio.Future]]:
        """Wait until a pass is due (paced, see the module docstring); take its reasons and the
        futures to resolve once it ran (`done`)."""
        await self._wake.wait()
        if all(r.startswith(ARRIVALS) for r in self.reasons) and self.host.serving():
            pause = self._last_end + ARRIVAL_PASS_INTERVAL_S - self.clock.monotonic()
            if pause > 0:
                await self.clock.sleep(pause)
            await self._small_arrivals_served()
        self._wake.clear()
        reasons, self.reasons = self.reasons, []
        waiters, self._waiters = self._waiters, []
        return reasons, waiters

    def needed(self, reasons: list[str]) -> bool:
        """Whether a pass for `reasons` is needed: not when each is a batch's arrival and that
        batch is done already."""
        return not all(self._arrived_and_done(r) for r in reasons)

    def done(self, waiters: list[asyncio.Future]) -> None:
        """The pass `next` gave `waiters` with ended (or was dropped)."""
        self._last_end = self.clock.monotonic()
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def close(self) -> None:
        """Resolve every waiter: no pass will run any more."""
        self.done(self._waiters)

    async def _small_arrivals_served(self) -> None:
        """Wait, at most SMALL_ARRIVAL_WAIT_S, while the coming pass is only for small batches
        that running engines serve at once; return once they are all done (see the module
        docstring)."""
        end = self.clock.monotonic() + SMALL_ARRIVAL_WAIT_S
        while self.reasons and all(self._served_at_once(r) for r in self.reasons):
            left = end - self.clock.monotonic()
            if left <= 0 or all(self._arrived_and_done(r) for r in self.reasons):
                return
            # until one of them is done, another reason comes, or the time is up (each reason is
            # an arrival here; one not done has its batch's event, not set yet)
            self._more.clear()
            await wait_events(self.clock, [self._more] + [
                self.host.finished_event(arrived(r)) for r in self.reasons
                if not self._arrived_and_done(r)], left)

    def _arrived_and_done(self, reason: str) -> bool:
        batch_id = arrived(reason)
        if batch_id is None:
            return False
        finished = self.host.finished_event(batch_id)
        return finished is None or finished.is_set()

    def _served_at_once(self, reason: str) -> bool:
        batch_id = arrived(reason)
        return batch_id is not None and (self._arrived_and_done(reason)
                                         or self.host.served_at_once(batch_id))
