"""The executor's bookkeeping: requests, batches, pools of batches, per-model queues.

Pure state with guarded transitions (no engines, no I/O). A request that depends on others of its
batch starts WAITING (`runtime.executor.deps`) and is QUEUED when they completed. One request moves
QUEUED -> INFLIGHT -> (QUEUED again after a preemption or an engine death) -> REPORTING -> DONE;
CANCELLED from QUEUED or INFLIGHT, or from REPORTING when its batch was cancelled before the outcome
could be made durable. A request counts as DONE only once its batch's sink returned.

A *pool* is a group of batches that share a strategy and are planned as one multi-LLM job. Pools run
one after another in submission order; a new batch joins the newest pool when the strategies match
(it then never overtakes an earlier batch of another strategy).
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Any, Sequence

from runtime.executor_api import OutcomeSink, WorkItem
from runtime.placeholders import substitute


class ReqState(enum.IntEnum):
    WAITING = -1  # for upstream requests of its batch (depends_on); not in any queue
    QUEUED = 0
    INFLIGHT = 1
    REPORTING = 2  # the engine answered; the sink is being awaited (never aborted)
    DONE = 3
    CANCELLED = 4

    @property
    def finished(self) -> bool:
        return self >= ReqState.DONE


class TransitionError(RuntimeError):
    """A request was moved out of a state it was not in (a bug in the executor)."""


@dataclass(eq=False)  # identity semantics: requests live in sets and dicts
class Req:
    batch_id: str
    item: WorkItem
    state: ReqState = ReqState.QUEUED
    attempts: int = 0  # times sent to an engine (preemptions and failures included)
    failures: int = 0  # times its engine died under it (bounded by limits.max_retries)
    task: asyncio.Task | None = None  # the task sending it or reporting its outcome (cancel awaits it)
    # upstream custom_id -> its generated text, put in the body's placeholders when sent
    inputs: dict[str, str] = field(default_factory=dict)
    known_tokens: int = 0  # output tokens of the upstream requests finished (planning: prompt)
    # the engine's queue order (vLLM `priority`, lower first), set when it is dispatched (`queues`)
    priority: int = 0
    sent_s: float | None = None  # when this attempt was sent to its engine (executor clock)

    @property
    def model(self) -> str:
        return self.item.model

    def _move(self, frm: tuple[ReqState, ...], to: ReqState) -> None:
        if self.state not in frm:
            raise TransitionError(f"{self.item.custom_id}: {self.state.name} -> {to.name}")
        self.state = to

    def body(self) -> dict[str, Any]:
        """The body sent to the engine: the stored one, its placeholders filled in."""
        body = self.item.body
        return substitute(body, self.item.url, self.inputs) if self.inputs else body

    def wait(self) -> None:
        self._move((ReqState.QUEUED,), ReqState.WAITING)

    def release(self) -> None:
        self._move((ReqState.WAITING,), ReqState.QUEUED)

    def dispatch(self) -> None:
        self._move((ReqState.QUEUED,), ReqState.INFLIGHT)
        self.attempts += 1

    def requeue(self) -> None:
        self._move((ReqState.INFLIGHT,), ReqState.QUEUED)

    def report(self) -> None:
        # QUEUED/WAITING -> REPORTING: an error outcome for a request that never reached an engine
        self._move((ReqState.WAITING, ReqState.QUEUED, ReqState.INFLIGHT), ReqState.REPORTING)

    def done(self) -> None:
        self._move((ReqState.REPORTING,), ReqState.DONE)

    def cancel(self) -> None:
        self._move((ReqState.WAITING, ReqState.QUEUED, ReqState.INFLIGHT), ReqState.CANCELLED)

    def abandon(self) -> None:
        """Its batch was cancelled while its outcome could not be stored: it is reported as
        cancelled, like a request that never ran."""
        self._move((ReqState.REPORTING,), ReqState.CANCELLED)


@dataclass(eq=False)
class BatchState:
    batch_id: str
    sink: OutcomeSink
    strategy: str
    reqs: list[Req]
    events: list[dict[str, Any]] = field(default_factory=list)
    cancelled: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    open_count: int = -1  # requests without an outcome yet (a counter: checked at every outcome)
    graph: Any = None  # its `runtime.executor.deps.BatchGraph` when some request depends on another

    def __post_init__(self) -> None:
        self.open_count = len(self.reqs)

    @property
    def open_reqs(self) -> list[Req]:
        return [r for r in self.reqs if not r.state.finished]

    def closed_one(self) -> None:
        """One request got its outcome (DONE)."""
        self.open_count -= 1

    @property
    def running(self) -> bool:
        return not self.cancelled and self.open_count > 0

    def check_finished(self) -> bool:
        if not self.running:
            self.finished.set()
        return self.finished.is_set()


@dataclass(eq=False)
class Pool:
    """Batches planned together. Only the head pool of the executor is active (has queued requests)."""

    strategy: str
    batches: list[BatchState] = field(default_factory=list)
    active: bool = False  # its requests are in the model queues
    plans: int = 0  # plans made for it (the first is a "plan", later ones "replan")

    def open_reqs(self) -> list[Req]:
        return [r for b in self.batches for r in b.open_reqs]

    def has_open(self) -> bool:
        return any(b.running for b in self.batches)

    @property
    def batch_ids(self) -> list[str]:
        return [b.batch_id for b in self.batches]


def prefix_order(items: list[WorkItem]) -> list[WorkItem]:
    """A batch's requests in the order its queues take them: requests sharing a prompt prefix
    next to each other (BatchLLM's grouping), so vLLM's cache still holds the prefix when the next
    one is admitted. Sorting by the hash chain (`WorkItem.prefix`) is a depth-first walk of the
    prefix tree; stable, and a batch that shares nothing keeps its input order."""
    if not any(it.prefix for it in items):
        return items
    return sorted(items, key=_prefix_key)


def _prefix_key(item: WorkItem) -> tuple[int, ...]:
    return item.prefix


def batch_reqs(batch_id: str, items: Sequence[WorkItem]) -> list[Req]:
    """A batch's requests, in `prefix_order`: how `serve` queues them and `samullm plan` plans
    them (the planner's DP split follows this order)."""
    return [Req(batch_id, it) for it in prefix_order(list(items))]
