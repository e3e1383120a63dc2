"""The per-model queues the engine replicas pull from, and whose request goes next.

Pooling makes samullm fast, but a pool served in arrival order makes a 5-request evaluation wait
behind whoever submitted 800 requests first. So each model's queue is one queue per batch, and a
replica takes its next request from the batch with the least left, aged (`fairness = "fair"`:
shortest remaining first, which minimises the batches' mean completion time): a batch's claim is
what it has left in all, on every model (`left_of`, the executor's open requests; by its queue
of this model alone, a 2,000-request batch with a few left queued for `medium` and 61 in flight
there went before a 20-request batch, which waited at the in-flight cap for answers: 4.1 s
against 0.9 s alone, its preemption 2.3 s late), minus `AGING` for every dispatch that went to
another batch since it was last served (or joined), so a small batch arriving behind a big one
is dispatched at once, and the big one goes again within (its size - the other's) / (AGING - 1)
dispatches: never starved, whatever arrives. A batch that had nothing queued joins again with
no claim for the time it was away. The engines never idle for it (any batch with work is
served). `fairness = "fifo"`: the earliest batch first, in arrival order. Either way a batch
predicted to miss its completion window (`urgent`, `runtime.executor.deadlines`) goes before the
others.

An engine holds more requests than it runs (`slots.INFLIGHT_FACTOR`); those wait in vLLM's own
queue, which the engines order by `priority` (`runtime.engines.engine.build_command`): each
request carries what its batch had left when it was dispatched, to a power of two (`_priority`),
so a small batch's requests also pass the big one's already waiting there; and where a much
bigger batch has requests in flight on the engine, they are aborted and held back while the small
batch runs (`seats`).

Within a batch, requests go in the order `pool_state.prefix_order` gave them; a replica marked
`tail` takes its batch's requests from the end (prefix affinity: two replicas meet once in a
prefix-ordered queue, so each prefix group is paid on one replica).
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Callable

from runtime.config import FAIRNESS
from runtime.executor.pool_state import Req, ReqState

AGING = 4  # requests a waiting batch's claim grows by per dispatch that went to another batch


class ModelQueues:
    """QUEUED requests per model and batch, for the active pool; DP replicas pull from the same one.

    `finish_signalled[model]` remembers that a "model finished" event was emitted for the queue's
    current contents, so the event fires once per drain (a push resets it)."""

    def __init__(self, fairness: str = "fair", urgent: set[str] | None = None,
                 left_of: Callable[[str], int] | None = None) -> None:
        if fairness not in FAIRNESS:
            raise ValueError(f"fairness: one of {', '.join(FAIRNESS)}; got {fairness!r}")
        self.fair = fairness == "fair"
        # batches predicted to miss their deadline (`deadlines.Deadlines`): served before the others
        self.urgent: set[str] = urgent if urgent is not None else set()
        # what a batch has left in all, on every model (the executor's `batch_open`): its claim
        # and its requests' priority; None: its queue of the model (see the module docstring)
        self.left_of = left_of
        # model -> batch -> its queued requests (batches in arrival order; cancelled ones are
        # skipped lazily)
        self._q: dict[str, dict[str, deque[Req]]] = {}
        # model -> dispatches so far, and per batch the count when it was last served or joined
        self._count: dict[str, int] = {}
        self._since: dict[str, dict[str, int]] = {}
        self.finish_signalled: dict[str, bool] = {}
        # WAITING requests per model (active pool): a model with some is not finished
        self.waiting: dict[str, int] = {}

    def push(self, req: Req, front: bool = False) -> None:
        by_batch = self._q.setdefault(req.model, {})
        q = by_batch.get(req.batch_id)
        if q is None:
            q = by_batch[req.batch_id] = deque()
            self._since.setdefault(req.model, {})[req.batch_id] = self._count.get(req.model, 0)
        # re-queued requests go first: they were admitted earlier (input order is kept where possible)
        q.appendleft(req) if front else q.append(req)
        self.finish_signalled[req.model] = False

    def pop(self, model: str, tail: bool = False, at_most: int | None = None) -> Req | None:
        """The next request for a replica of `model` (see the module docstring); `at_most`: from
        the batches whose `priority` is at most that only (small ones, for a guest engine)."""
        by_batch = self._q.get(model)
        while by_batch:
            batch = self._next_batch(model, self._within(by_batch, at_most))
            if not batch:
                return None
            q = by_batch[batch]
            while q:
                req = q.pop() if tail else q.popleft()
                if req.state is ReqState.QUEUED:
                    self._count[model] = self._count.get(model, 0) + 1
                    self._since[model][batch] = self._count[model]
                    req.priority = self._priority(batch, len(q))
                    if not q:
                        self._leave(model, batch)
                    return req
            self._leave(model, batch)
        return None

    def _within(self, by_batch: dict[str, deque[Req]], at_most: int | None
                ) -> dict[str, deque[Req]]:
        if at_most is None:
            return by_batch
        return {b: q for b, q in by_batch.items() if q and self._priority(b, len(q) - 1) <= at_most}

    def _left(self, batch: str, queued: int) -> int:
        """What `batch` has left, with `queued` in this model's queue (`left_of`)."""
        return self.left_of(batch) if self.left_of is not None else queued

    def priorities(self, model: str) -> dict[str, int]:
        """Per batch with requests of `model` queued, the `priority` its next one would get."""
        return {b: self._priority(b, len(q) - 1) for b, q in self._q.get(model, {}).items() if q}

    def next_priority(self, model: str) -> tuple[int, str] | None:
        """The `priority` the next `pop(model)` would give its request, and its batch; None:
        nothing queued."""
        if not self.has_queued(model):
            return None
        batch = self._next_batch(model, self._q[model])
        return self._priority(batch, len(self._q[model][batch]) - 1), batch

    def _priority(self, batch: str, left: int) -> int:
        """The engine's order among the requests it holds (vLLM `priority`, lower first; ties in
        arrival order): fair, what the request's batch has left (`_left`), to a power of two (a
        small batch's requests pass the big one's already waiting there; a batch's own keep their
        order but where its count halves); a batch moved up for its deadline before all; fifo:
        all alike (arrival order)."""
        if batch in self.urgent:
            return -1
        return self._left(batch, left).bit_length() if self.fair else 0

    def _next_batch(self, model: str, by_batch: dict[str, deque[Req]]) -> str:
        return self._pick(by_batch, self._count.get(model, 0), self._since.get(model, {}))

    def _pick(self, by_batch: dict[str, deque[Req]], now: int, since: dict[str, int]) -> str:
        """The batch whose request goes next (see the module docstring), `now` dispatches so far
        and `since` the count when each batch was last served or joined; "" when there is none."""
        first = next(iter(by_batch), "")
        if len(by_batch) <= 1:
            return first
        pick = [b for b in by_batch if b in self.urgent] if self.urgent else []
        if not self.fair:
            return pick[0] if pick else first
        # ties: the earliest (dict order)
        return min(pick or by_batch,
                   key=lambda b: self._left(b, len(by_batch[b])) - AGING * (now - since[b]))

    def order(self, model: str) -> list[Req]:
        """`model`'s queued requests in the order `pop` would hand them out if nothing else
        arrived (the planner simulates them in this order: `serving_order`)."""
        # copies, cancelled entries kept: `pop` counts them in a batch's claim until it skips them
        by_batch = {b: deque(q) for b, q in self._q.get(model, {}).items()}
        now, since = self._count.get(model, 0), dict(self._since.get(model, {}))
        out: list[Req] = []
        while by_batch:
            if len(by_batch) == 1:  # the rest in its order (a pool of one big batch: no loop)
                out += (r for r in next(iter(by_batch.values())) if r.state is ReqState.QUEUED)
                break
            batch = self._pick(by_batch, now, since)
            q = by_batch[batch]
            while q:
                req = q.popleft()
                if req.state is ReqState.QUEUED:
                    now += 1
                    since[batch] = now
                    out.append(req)
                    break
            if not q:
                del by_batch[batch]
        return out

    def _leave(self, model: str, batch: str) -> None:
        """`batch` has nothing queued for `model`: it leaves (it joins again with no claim for the
        time it had nothing queued)."""
        by_batch = self._q[model]
        del by_batch[batch]
        self._since[model].pop(batch, None)
        if not by_batch:
            del self._q[model]

    def has_queued(self, model: str, at_most: int | None = None) -> bool:
        """Whether `model` has requests queued (of batches whose `priority` is at most `at_most`,
        when given)."""
        by_batch = self._q.get(model)
        found = False
        for batch in list(by_batch or ()):
            q = by_batch[batch]  # type: ignore[index]
            while q and q[0].state is not ReqState.QUEUED:
                q.popleft()  # drop cancelled heads: the new head, if any, is queued
            if not q:
                self._leave(model, batch)
            elif at_most is None or self._priority(batch, len(q) - 1) <= at_most:
                found = True
        return found

    def count(self, model: str) -> int:
        """How many requests of `model` are queued, cancelled ones not yet skipped included (a
        bound, in time proportional to its batches)."""
        return sum(len(q) for q in self._q.get(model, {}).values())

    def queued(self, model: str) -> list[Req]:
        return [r for q in self._q.get(model, {}).values() for r in q
                if r.state is ReqState.QUEUED]

    def models(self) -> list[str]:
        return [m for m in list(self._q) if self.queued(m)]

    def drain(self, model: str) -> list[Req]:
        """Remove and return every queued request of `model`."""
        reqs = self.queued(model)
        self._q.pop(model, None)
        self._since.pop(model, None)
        return reqs

    def purge(self) -> None:
        """Forget cancelled entries (they are skipped anyway; this bounds memory)."""
        for m in list(self._q):
            for batch in list(self._q[m]):
                q = deque(r for r in self._q[m][batch] if r.state is ReqState.QUEUED)
                if q:
                    self._q[m][batch] = q
                else:
                    self._leave(m, batch)


def serving_order(reqs: list[Req], queues: ModelQueues) -> list[Req]:
    """`reqs` (a pool's open requests, in arrival order) in the order its engines serve them,
    the order the planner simulates them in (FCFS by position): those in flight first, then each
    model's queued ones as `queues` hands them out, then those waiting for upstream requests. In
    arrival order the plan put a small batch behind the big one it joined, and predicted it done
    with it, while fair queues serve it first (its ETA and its deadline check read that)."""
    queued = {r for r in reqs if r.state is ReqState.QUEUED}
    if not queues.fair or not queued:
        return reqs
    ordered = [r for m in dict.fromkeys(r.model for r in queued) for r in queues.order(m)
               if r in queued]
    seen = set(ordered)
    return ([r for r in reqs if r.state is ReqState.INFLIGHT] + ordered
            + [r for r in reqs if r.state is ReqState.QUEUED and r not in seen]
            + [r for r in reqs if r.state not in (ReqState.INFLIGHT, ReqState.QUEUED)])


def idle_gateway_order(reqs: list[Req], fairness: str) -> list[Req]:
    """The serving order (`serving_order`) of `reqs`, batches submitted together to an idle
    gateway with `[scheduler] fairness` (`samullm plan` predicts what that gateway's plan does)."""
    left = Counter(r.batch_id for r in reqs if not r.state.finished)
    queues = ModelQueues(fairness, left_of=left.__getitem__)
    for r in reqs:
        if r.state is ReqState.QUEUED:
            queues.push(r)
    return serving_order(reqs, queues)
