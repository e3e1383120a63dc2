"""Which of a slot's in-flight requests its engine runs, and which one to abort for a small batch.

vLLM runs at most `max_num_seqs` requests at once (its "seats") and keeps the others waiting. It
admits a waiting request only when a running one leaves, the best `priority` first (then the
earliest); under the priority policy it preempts a running request only when its KV cache runs
short, never for a better priority. So a small batch's requests, first in the engine's waiting
queue (`queues._priority`), still waited for as many of a big batch's running requests to finish:
a 20-request batch on a saturated `small` engine took 0.8-1.0 s against 0.3 s alone
(`bench/fairness.py --mix`, 5 Dec 2026).

vLLM does not say which requests it runs, so `InFlight` emulates its admission from what the slot
sent and got back. When a request of a batch about small enough to run at once (`priority` at most the
seats' bit length: fewer than twice the seats left) finds every seat taken, and some by other
batches with `PREEMPT_GAP` powers of two more left, the slot aborts the one of those admitted last,
the least done (its tokens so far are what the preemption costs), and re-queues it at the head of
its batch (`dispatch.dispatch_loop`). With `fairness = "fifo"` every priority is 0: nothing is preempted.
"""

from __future__ import annotations

import asyncio

from runtime.executor.pool_state import Req

# a running request is aborted only for a request whose batch has at least 2 ** PREEMPT_GAP times
# fewer left: a 20-request batch preempts a 100-request one, not a 40-request one (their tokens
# lost would buy the small batch little)
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

    def victim(self, priority: int, batch: str) -> Req | None:
        """The running request to abort so that one of `priority` of `batch`, not running, runs
        now (see the module docstring); None: a seat is free, or nothing running is worth
        aborting for it. Never one of `batch`'s own: each of its requests carries what it had left
        when it went, fewer and fewer, so its later ones would abort its earlier ones."""
        if len(self.running) < self.seats or priority > self.seats.bit_length():
            return None
        worse = [r for r in self.running
                 if r.priority >= priority + PREEMPT_GAP and r.batch_id != batch]
        return worse[-1] if worse else None
