"""Making each request's outcome durable, and pausing dispatch while outcomes cannot be stored.

A request counts only once its outcome is durable: its batch's sink returned (the gateway's journal
appended it). While the sink raises (a full disk under the journal), the outcome is kept and handed
to the sink again with backoff (STORE_RETRY_S), and dispatch pauses for every batch, since they
share the state dir: engines finish what they hold, nothing new is sent (`dispatch.SlotHost.
dispatch_paused`), and the batch resumes when an append succeeds again. A cancel of the batch or
the executor's close stops the retries: the cancelled batch reports such requests as cancelled;
after a shutdown they are not journaled, and run again on the next start.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from runtime.clock import Clock, wait_event
from runtime.executor.pool_state import BatchState, Req
from runtime.executor_api import Outcome

log = logging.getLogger(__name__)
STORE_RETRY_S = (0.1, 2.0)  # first and longest wait between attempts to store an outcome


class OutcomeStore:
    """The outcomes the sink refused so far, retried until stored (see the module docstring)."""

    def __init__(self, clock: Clock, emit: Callable[..., Any],
                 resume_dispatch: Callable[[], None]) -> None:
        self.clock = clock
        self._emit = emit  # `PoolExecutor.emit`: storage_stalled / storage_resumed
        self._resume = resume_dispatch  # wake every slot's dispatch
        self._stalled: set[Req] = set()  # requests whose outcome the sink refused (not durable)
        self._retry = asyncio.Event()  # pulsed to retry stalled outcomes now
        self._closing = False

    @property
    def paused(self) -> bool:
        """Whether dispatch is paused: some outcome is not durable yet."""
        return bool(self._stalled)

    async def store(self, batch: BatchState, req: Req, outcome: Outcome) -> bool:
        """Hand the outcome to the batch's sink until it is durable (True), or until a cancel of
        the batch or the close makes that moot (False). Pauses dispatch meanwhile."""
        wait = STORE_RETRY_S[0]
        try:
            while True:
                try:
                    await batch.sink(outcome)
                    return True
                except Exception as exc:  # ENOSPC under the journal, most likely
                    if batch.cancelled or self._closing:
                        return False
                    if not self._stalled:
                        self._emit("storage_stalled", message=f"{type(exc).__name__}: {exc}")
                        log.error("outcomes cannot be stored (%s): dispatch paused until they can",
                                  exc)
                    self._stalled.add(req)
                await wait_event(self.clock, self._retry, wait)
                wait = min(STORE_RETRY_S[1], wait * 2)
        finally:
            if req in self._stalled:
                self._stalled.discard(req)
                if not self._stalled:
                    self.retry_now()
                    if not self._closing:
                        self._emit("storage_resumed")
                        log.warning("outcomes are stored again: dispatch resumed")
                    self._resume()

    def retry_now(self) -> None:
        """Wake every stalled outcome for an attempt now (space came back, a cancel, a close)."""
        self._retry.set()
        self._retry.clear()

    def close(self) -> None:
        """Stop retrying: the stalled outcomes are left to the next start."""
        self._closing = True
        self.retry_now()
