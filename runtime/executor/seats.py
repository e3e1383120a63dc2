"""A slot's in-flight requests, and how a small batch gets the slot's engine to itself.

vLLM runs at most `max_num_seqs` requests at once (its "seats") and keeps the others waiting. It
admits a waiting request only when a running one leaves, the best `priority` first (then the
earliest); under the priority policy it preempts a running request only when its KV cache runs
short, never for a better priority. So a small batch's requests, first in the engine's waiting
queue (`queues._priority`), still waited for as many of a big batch's running requests to finish:
a 20-request batch on a saturated `small` engine took 0.8-1.0 s against 0.3 s alone
(`bench/fairness.py --mix`, 5 Dec 2026).

Aborting only as many of the big batch's running requests as the small one needs was not
enough: the engine then ran the small batch beside the rest of the big one's, and each step of 32
sequences cost about 1.6× one of 20. Measured on `small`'s engine alone (`bench/seats.py`: one
core, 32 seats, 48 of a 400-request big batch's 64-token requests kept in flight, then 20 of 16
tokens; medians of 3, 5 Dec 2026): the 20 took 0.22 s on the idle engine, 0.70 s by `priority`
alone, 0.58 s with 20 of the big batch's running requests aborted, and 0.24 s with all of its
requests aborted and none sent until the 20 were done; the big batch took 8.95 s with no small
one, +0.54 s, +0.81 s and +0.42 s (the small batch's own work included): holding the engine
costs the big batch least too, since an engine's step costs about as much per sequence at 20
as at 32, and what it loses is only the aborted requests' tokens so far.

So the slot *holds* its engine for small batches. vLLM does not say which requests it runs, and
the hold need not know: it aborts every in-flight request of the big batches. A batch's *size*
here is what it has open in all, on every model, to a power of two as a `priority` is
(`SlotHost.batch_size`). It is *small* when that and its request's `priority` are at most the
seats' bit length (fewer than twice the seats left), *big* when its size is `PREEMPT_GAP` above
that (more than 4× the seats open). The size is the whole batch's, not its queue of this model:
a 2,000-request batch whose share of `medium` had drained to a few dozen requests there, with
hundreds still open on `small`, counted as small on `medium`, and a 20-request batch waited for
its seats (6.1 s against 1.6 s alone, `bench/fairness.py --mix`, 5 Dec 2026); what a batch has
left anywhere is what its completion waits for.

When a small batch's request is sent to a slot where big batches have requests in flight, the
slot aborts all of those, running or waiting in the engine (the running ones' tokens so far are
what it costs), and re-queues them at the head of their batch (`dispatch.dispatch_loop`).
Then, while small batches' requests are in flight there, it sends no big batch's request, unless
a small batch still has requests queued and the fair queues' aging chose the big one over it
anyway (so the hold never starves a big batch that the queues would serve). The hold is bounded
by what it leaves unused: `HOLD_MAX_S` seconds of all the engine's seats (the share the small
batches leave empty, over time), and `HOLD_CAP_S` in all. That is for a small batch of a few
long answers, which would otherwise keep an engine of many seats on a handful of sequences; a
batch that fills most seats is held longer. A bound of 2 s of time ended the hold for
a 20-request batch on a `medium` engine that had just started: the big batch's 48 requests were
sent again, their prefill ran between the small batch's last decode steps, and it took 3.3 s
against 0.8 s alone (`bench/fairness.py --mix`, 6 Dec 2026).

Small batches never preempt each other: the priority each request carries is what its batch had
left when it went, and compared across batches that drain quickly those made five 20-request
batches abort 61 of each other's requests in 0.4 s (5 Dec 2026, `bench/fairness.py --mix`, when
tiny-a's engine came up to all five at once). A big batch that drained to 4× the seats (in all)
is not preempted any more. With `fairness = "fifo"` every priority is 0: nothing is preempted or held.
"""

from __future__ import annotations

import asyncio
from typing import Mapping

from runtime.executor.pool_state import Req

# what a big batch's priority is above a small one's at least (powers of two of what they have
# open, see the module docstring): 32 seats, a batch with up to 63 open preempts one with 128
# or more open
PREEMPT_GAP = 2
# what a hold may leave unused of its engine, in seconds of all its seats: the seats the small
# batches leave empty, integrated over the hold. Several times what a 20-request batch of short
# answers takes alone (0.1-0.3 s on the demo models, 0.8 s on `medium`), short against a big
# batch's run (the fairness bench's: 40-45 s). A 20-request batch on 32 seats is held up to
# 5.3 s, one request of a long answer 2.1 s
HOLD_MAX_S = 2.0
# the longest hold, however full the small batches keep the seats
HOLD_CAP_S = 10.0


class InFlight(dict[Req, asyncio.Task]):
    """A slot's in-flight requests (request -> its task), in dispatch order, its engine's seats
    (`max_num_seqs`), and whether the slot holds the engine for small batches (see the module
    docstring)."""

    def __init__(self, seats: int) -> None:
        super().__init__()
        self.seats = max(1, seats)
        # when the slot began holding its engine for small batches (None: it does not)
        self.held_since: float | None = None
        # seat-seconds the hold left unused so far (in seconds of all seats), counted up to
        # `_counted_at` (`hold_left`)
        self._unused_s = 0.0
        self._counted_at = 0.0

    def small(self) -> int:
        """The highest `priority` of a small batch (see the module docstring)."""
        return self.seats.bit_length()

    def victims(self, priority: int, batch: str, current: Mapping[str, int]) -> list[Req]:
        """The requests to abort now that one of `priority` of `batch` is sent, by `current`
        size per batch (see the module docstring): every one of the big batches' in flight, in
        dispatch order; none when the batch is not small."""
        small = self.small()
        if priority > small or current.get(batch, priority) > small:
            return []
        return [r for r in self
                if r.batch_id != batch and current.get(r.batch_id, 0) >= small + PREEMPT_GAP]

    def hold(self, now: float) -> None:
        """Start holding the engine for the small batches in flight (their requests preempted
        the big ones' at `now`, a monotonic time)."""
        self.held_since = self._counted_at = now
        self._unused_s = 0.0

    def hold_left(self, now: float) -> float | None:
        """Seconds the hold has left at most (None: no hold): until its seats' unused time
        reaches HOLD_MAX_S at the present share of them the small batches leave empty, or until
        HOLD_CAP_S. The share since the last count is taken as the present one (the dispatch
        loop counts at each answer; an answer between counts is charged early: the hold ends
        sooner, never later)."""
        if self.held_since is None:
            return None
        small = self.small()
        empty = 1.0 - min(1.0, sum(r.priority <= small for r in self) / self.seats)
        self._unused_s += max(0.0, now - self._counted_at) * empty
        self._counted_at = max(self._counted_at, now)
        left = self.held_since + HOLD_CAP_S - now
        if empty > 0:
            left = min(left, (HOLD_MAX_S - self._unused_s) / empty)
        if left <= 0 or empty >= 1.0:
            self.held_since = None  # ended: its bound, or the small batches are done
            return None
        return left

    def holds(self, batch: str, current: Mapping[str, int], now: float) -> bool:
        """Whether `batch`'s next request is kept back (see the module docstring), by `current`
        size per batch with something queued: a hold is on, `batch` is big and no small batch
        has anything queued (aging chose it over them)."""
        if self.hold_left(now) is None:
            return False
        small = self.small()
        return current.get(batch, 0) >= small + PREEMPT_GAP and not any(
            p <= small for b, p in current.items() if b != batch)
