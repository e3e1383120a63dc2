"""Which of a slot's in-flight requests its engine runs, and which one to abort for a small batch.

vLLM runs at most `max_num_seqs` requests at once (its "seats") and keeps the others waiting. It
admits a waiting request only when a running one leaves, the best `priority` first (then the
earliest); under the priority policy it preempts a running request only when its KV cache runs
short, never for a better priority. So a small batch's requests, first in the engine's waiting
queue (`queues._priority`), still waited for as many of a big batch's running requests to finish:
a 20-request batch on a saturated `small` engine took 0.8-1.0 s against 0.3 s alone
(`bench/fairness.py --mix`, 5 Dec 2026).

vLLM does not say which requests it runs, so `InFlight` emulates its admission from what the slot
sent and got back. A batch is *small* here when its `priority` is at most the seats' bit length
(fewer than twice the seats left), *big* when its current one (what it has queued now, `queues`)
is `PREEMPT_GAP` above that (more than 4× the seats queued). When a small batch's request finds every
seat taken, and some by big batches, the slot aborts the big batches' request admitted last, the
least done (its tokens so far are what the preemption costs), and re-queues it at the head of its
batch (`dispatch.dispatch_loop`). Small batches never preempt each other: the priority each
request carries is what its batch had left when it went, and compared across batches that drain
quickly those made five 20-request batches abort 61 of each other's requests in 0.4 s (5 Dec
2026, `bench/fairness.py --mix`, when tiny-a's engine came up to all five at once). A big batch
that drained to 4× the seats is not preempted any more. With `fairness = "fifo"` every
priority is 0: nothing is preempted.
"""

from __future__ import annotations

import asyncio
from typing import Mapping

from runtime.executor.pool_state import Req

# what a big batch's priority is above a small one's at least (powers of two of what they have
# left, see the module docstring): 32 seats, a batch with up to 63 left preempts one with 129 or
# more queued
PREEMPT_GAP = 2


class InFlight(dict[Req, asyncio.Task]):
    """A slot's in-flight requests (request -> its task), in dispatch order, and `running`: those
    its engine runs, by vLLM's admission (see the module docstring). Every way a request leaves
    the slot (its answer, an abort, a stop) goes through `del`, `pop` or `clear`, which free its
    seat for the best waiting one."""

    def __init__(self, seats: int) -> None:
        super().__init__()
        self.seats = max(1, seats)
        self.running: dict[Req, None] = {}  # in admission order

    def __setitem__(self, req: Req, task: asyncio.Task) -> None:
        super().__setitem__(req, task)
        if len(self.running) < self.seats:
            self.running[req] = None

    def __delitem__(self, req: Req) -> None:
        super().__delitem__(req)
        self._left(req)

    def pop(self, req: Req, *default):  # type: ignore[override]
        out = super().pop(req, *default)
        self._left(req)
        return out

    def clear(self) -> None:
        super().clear()
        self.running.clear()

    def _bypass(self, *args, **kwargs):  # would skip the seats' bookkeeping
        raise TypeError("InFlight: set, del, pop or clear one request at a time")

    update = setdefault = popitem = _bypass  # type: ignore[assignment]

    def _left(self, req: Req) -> None:
        if req in self.running:
            del self.running[req]
            waiting = [r for r in self if r not in self.running]
            if waiting:  # the best priority, then the earliest (min keeps the first of equals)
                self.running[min(waiting, key=lambda r: r.priority)] = None

    def victim(self, priority: int, batch: str, current: Mapping[str, int]) -> Req | None:
        """The running request to abort so that one of `priority` of `batch`, not running, runs
        now, by `current` priority per batch with something queued (see the module docstring);
        None: a seat is free, the batch is not small, or nothing running is of a big one."""
        small = self.seats.bit_length()
        if len(self.running) < self.seats or priority > small:
            return None
        big = [r for r in self.running
               if r.batch_id != batch and current.get(r.batch_id, 0) >= small + PREEMPT_GAP]
        return big[-1] if big else None
