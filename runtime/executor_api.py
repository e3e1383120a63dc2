"""The seam between the gateway and the runtime.

The gateway validates a batch, then hands its not-yet-finished requests to an `Executor` as `WorkItem`s
(bodies stay in the stored input file until sent).
The executor pools every batch in progress into one multi-LLM job, runs it on engines, and reports each
finished request exactly once as an `Outcome` to the batch's `OutcomeSink` (the gateway's durable
journal). A request counts as done only once the sink has returned. The executor never writes the
batch's output files: the gateway finalizes them from the journal when `Executor.wait` returns. What happens meanwhile (plans, engines)
is reported as events to the `EventSink`s given to `Executor.listen`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Protocol, Sequence


class BodySource(Protocol):
    """A way to read a request's body when it is sent (the gateway's `gateway.lines.LineRef`: where
    its line lies in the stored input file). The runtime never parses the gateway's line format."""

    def load_body(self) -> dict[str, Any]: ...


class WorkItem:
    """One validated request. The body is either held (`body=`, small or synthetic work) or read back
    from the input file on access (`ref=`): the executor plans with `model`, `prompt_tokens` and
    `max_tokens` only and reads `body` once, when it sends the request. Reading `body` may raise
    OSError/ValueError when the stored line is gone or no longer parses. A request with
    `depends_on` is sent only after those requests of its batch, with their generated text put in
    its placeholders (`runtime.placeholders.substitute`). `prefix`: the KV-block hashes of the
    prompt's leading blocks it shares with other requests of its batch (planning and queue order
    only; `gateway.prefixes`)."""

    __slots__ = ("line", "custom_id", "model", "url", "prompt_tokens", "max_tokens", "_body", "ref",
                 "depends_on", "prefix")
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, line: int, custom_id: str, model: str, url: str,
                 body: dict[str, Any] | None = None, prompt_tokens: int = 0, max_tokens: int = 0,
                 ref: BodySource | None = None, depends_on: tuple[str, ...] = ()) -> None:
        if (body is None) == (ref is None):
            raise ValueError("a WorkItem needs exactly one of `body` and `ref`")
        self.line = line  # 1-based line number in the input file (output files keep input order)
        self.custom_id = custom_id
        self.model = model  # body.model, a configured model name
        self.url = url  # "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings"
        # estimated prompt length in tokens (planning only); with depends_on, of the request's own
        # text (placeholders taken out): its dependencies' outputs are not known yet
        self.prompt_tokens = prompt_tokens
        # output cap (planning only): body max_tokens, else max_model_len - prompt
        self.max_tokens = max_tokens
        self._body, self.ref = body, ref
        # custom_ids of the batch's requests whose output this one takes in, in the line's order,
        # each once
        self.depends_on = depends_on
        self.prefix: tuple[int, ...] = ()

    @property
    def body(self) -> dict[str, Any]:
        """The request body, sent to the engine as is."""
        if self._body is not None:
            return self._body
        assert self.ref is not None
        return self.ref.load_body()

    def _key(self) -> tuple[Any, ...]:
        return (self.line, self.custom_id, self.model, self.url, self.prompt_tokens,
                self.max_tokens, self._body, self.ref, self.depends_on)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WorkItem) and self._key() == other._key()

    def __repr__(self) -> str:
        deps = f", depends_on={self.depends_on!r}" if self.depends_on else ""
        return (f"WorkItem(line={self.line}, custom_id={self.custom_id!r}, model={self.model!r}, "
                f"url={self.url!r}, prompt_tokens={self.prompt_tokens}, "
                f"max_tokens={self.max_tokens}{deps})")


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

# Called by the executor for each event as it emits it, with the ids of the batches it concerns and
# the event, `{"time": unix s, "event": kind, **data}` (one dict shared by those batches: read it,
# never change it). Called on the event loop: it must not block, and what it raises is only logged.
EventSink = Callable[[Sequence[str], Mapping[str, Any]], None]


class Executor(Protocol):
    async def start(self) -> None:
        """Discover devices; start background tasks. Engines start lazily when work arrives."""

    async def close(self) -> None:
        """Stop dispatching, abort in-flight requests, stop every engine (no orphans)."""

    def submit(self, batch_id: str, items: Sequence[WorkItem], sink: OutcomeSink,
               strategy: str | None = None, known: Mapping[str, Outcome] | None = None,
               deadline_at: float | None = None) -> None:
        """Add a batch's pending requests to the pool (re-plans). `strategy` None = config default.
        Batches with different strategies are never pooled together. `known`: the durable outcomes
        (journaled before a restart) of requests that pending ones depend on (`depends_on`).
        `deadline_at`: when the batch expires (unix s): predicted to miss it, it is moved up."""

    async def cancel(self, batch_id: str) -> None:
        """Drop queued requests, abort in-flight ones; returns when none of the batch runs any more.
        Cancelled requests get no Outcome (the gateway writes `batch_cancelled` lines)."""

    async def wait(self, batch_id: str) -> None:
        """Return when every submitted item of the batch has an Outcome, or the batch was cancelled."""

    def events(self, batch_id: str) -> list[dict[str, Any]]:
        """What happened for this batch: plans, engine starts/stops, re-plans (for logs and tests)."""

    def listen(self, sink: EventSink) -> None:
        """Report every later event to `sink` (the gateway stores each batch's events): plans and
        re-plans (stages, strategy, reasons, predicted makespan, each batch's predicted completion
        `batches_predicted_s`), engine start/started/stop/failed, model finished, batch
        submitted/finished/cancelled, deadline events."""

    def health(self) -> dict[str, Any]:
        """What `/health` shows of the executor (e.g. `spare_engines`); {} when nothing to add."""
