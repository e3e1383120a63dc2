"""The seam between the gateway and the runtime.

The gateway validates a batch, then hands its not-yet-finished requests to an `Executor` as `WorkItem`s.
The executor pools every batch in progress into one multi-LLM job, runs it on engines, and reports each
finished request exactly once as an `Outcome` to the batch's `OutcomeSink` (the gateway's durable
journal). A request counts as done only once the sink has returned. The executor never writes the
batch's output files: the gateway finalizes them from the journal when `Executor.wait` returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol, Sequence


@dataclass(frozen=True)
class WorkItem:
    line: int  # 1-based line number in the input file (output files keep input order)
    custom_id: str
    model: str  # body.model, a configured model name
    url: str  # "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings"
    body: dict[str, Any]  # the request body, sent to the engine as is
    prompt_tokens: int  # estimated prompt length in tokens (planning only)
    max_tokens: int  # output cap (planning only): body max_tokens, else max_model_len - prompt


@dataclass(frozen=True)
class Outcome:
    """One finished request. Exactly one of `response_body` / `error` is set."""

    custom_id: str
    line: int
    model: str
    status_code: int | None  # the engine's HTTP status (200 on success)
    response_body: dict[str, Any] | None = None
    error: dict[str, Any] | None = None  # {"code": ..., "message": ...}
    request_id: str = ""
    attempts: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.status_code == 200


# Called by the executor for each finished request; returns once the outcome is durable.
OutcomeSink = Callable[[Outcome], Awaitable[None]]


class Executor(Protocol):
    async def start(self) -> None:
        """Discover devices; start background tasks. Engines start lazily when work arrives."""

    async def close(self) -> None:
        """Stop dispatching, abort in-flight requests, stop every engine (no orphans)."""

    def submit(self, batch_id: str, items: Sequence[WorkItem], sink: OutcomeSink,
               strategy: str | None = None) -> None:
        """Add a batch's pending requests to the pool (re-plans). `strategy` None = config default.
        Batches with different strategies are never pooled together."""

    async def cancel(self, batch_id: str) -> None:
        """Drop queued requests, abort in-flight ones; returns when none of the batch runs any more.
        Cancelled requests get no Outcome (the gateway writes `batch_cancelled` lines)."""

    async def wait(self, batch_id: str) -> None:
        """Return when every submitted item of the batch has an Outcome, or the batch was cancelled."""

    def events(self, batch_id: str) -> list[dict[str, Any]]:
        """What happened for this batch: plans, engine starts/stops, re-plans (for logs and tests)."""
