"""An in-process executor double for gateway tests that need no engines (validation, listing, auth,
cancel, restart). It honours the `Executor` protocol: each item yields exactly one Outcome through
the sink, cancel stops the rest without outcomes; listeners hear `batch_submitted`, a `plan` (or
`replan`) predicting every running batch done in `predict_s`, and `batch_finished` /
`batch_cancelled`. Requests whose prompt contains "FAIL" get the HTTP
400 an engine would send, "CRASH" an `engine_failed` error without any HTTP answer. `hold()` makes
requests wait until `release(n)` lets n of them finish."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Sequence

from runtime.executor_api import EventSink, Outcome, OutcomeSink, WorkItem


class EchoExecutor:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.submitted: dict[str, list[WorkItem]] = {}
        self.strategies: dict[str, str | None] = {}
        self._tasks: dict[str, list[asyncio.Task[None]]] = {}
        self._gate: asyncio.Semaphore | None = None
        self.started = self.closed = False
        self.finished = 0
        self.predict_s = 60.0  # what each plan predicts for every running batch
        self._listeners: list[EventSink] = []
        self._plans = 0

    def hold(self) -> None:
        self._gate = asyncio.Semaphore(0)

    def release(self, n: int) -> None:
        assert self._gate is not None
        for _ in range(n):
            self._gate.release()

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True
        for bid in list(self._tasks):
            await self._stop(bid)

    def submit(self, batch_id: str, items: Sequence[WorkItem], sink: OutcomeSink,
               strategy: str | None = None, known: Any = None,
               deadline_at: float | None = None) -> None:
        self.submitted.setdefault(batch_id, []).extend(items)
        self.strategies[batch_id] = strategy
        tasks = self._tasks.setdefault(batch_id, [])
        tasks.extend(asyncio.create_task(self._run(it, sink)) for it in items)
        others = [b for b in self._tasks if b != batch_id]
        self._emit([batch_id], "batch_submitted", requests=len(items),
                   strategy=strategy or "samullm", pooled_with=others)
        self._plans += 1
        models = sorted({it.model for it in items})
        self._emit([*others, batch_id], "plan" if self._plans == 1 else "replan",
                   strategy=strategy or "samullm", reasons=[f"batch_submitted:{batch_id}"],
                   stage=[{"model": m, "tp": 1, "dp": 1, "devices": [0]} for m in models],
                   stages=1, predicted_makespan_s=self.predict_s,
                   batches_predicted_s={b: self.predict_s for b in [*others, batch_id]})

    async def _run(self, it: WorkItem, sink: OutcomeSink) -> None:
        if self._gate is not None:
            await self._gate.acquire()
        await asyncio.sleep(self.delay_s)
        await sink(outcome_for(it))
        self.finished += 1

    async def cancel(self, batch_id: str) -> None:
        if batch_id in self._tasks:
            self._emit([batch_id], "batch_cancelled")
        await self._stop(batch_id)

    async def _stop(self, batch_id: str) -> None:
        tasks = self._tasks.pop(batch_id, [])
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait(self, batch_id: str) -> None:
        while batch_id in self._tasks:
            tasks = list(self._tasks[batch_id])
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._tasks.get(batch_id) == tasks:
                self._tasks.pop(batch_id, None)
                self._emit([batch_id], "batch_finished")

    def events(self, batch_id: str) -> list[dict[str, Any]]:
        return [{"event": "submit", "items": len(self.submitted.get(batch_id, []))}]

    def health(self) -> dict[str, Any]:
        return {}

    def listen(self, sink: EventSink) -> None:
        self._listeners.append(sink)

    def _emit(self, batch_ids: list[str], kind: str, **data: Any) -> None:
        event = {"time": round(time.time(), 3), "event": kind, **data}
        for sink in self._listeners:
            sink(batch_ids, event)


def _text(it: WorkItem) -> str:
    if "messages" in it.body:
        return " ".join(str(m.get("content", "")) for m in it.body["messages"])
    return str(it.body.get("prompt", it.body.get("input", "")))


def outcome_for(it: WorkItem) -> Outcome:
    text = _text(it)
    if "FAIL" in text:
        body = {"object": "error", "message": "simulated engine rejection", "type": "BadRequestError",
                "param": None, "code": 400}
        # the shape the real executor gives a 4xx: `error` set, the engine's body in `extra`
        return Outcome(it.custom_id, it.line, it.model, 400,
                       error={"code": "400", "message": body["message"]},
                       request_id=f"req-{it.custom_id}", extra={"body": body})
    if "CRASH" in text:  # no HTTP answer at all: the engine died on every attempt
        return Outcome(it.custom_id, it.line, it.model, None,
                       error={"code": "engine_failed", "message": "engine died"}, attempts=3)
    completion = 3
    if it.url == "/v1/responses":  # vLLM's Responses API object, trimmed
        body = {"id": f"resp_{it.custom_id}", "object": "response", "model": it.model,
                "status": "completed", "output": [{
                    "type": "message", "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": f"echo {text[:20]}"}]}],
                "usage": {"input_tokens": it.prompt_tokens, "output_tokens": completion,
                          "total_tokens": it.prompt_tokens + completion}}
        return Outcome(it.custom_id, it.line, it.model, 200, response_body=body,
                       request_id=f"req-{it.custom_id}")
    body = {"id": f"cmpl-{it.custom_id}", "object": "chat.completion", "model": it.model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"echo {text[:20]}"}}],
            "usage": {"prompt_tokens": it.prompt_tokens, "completion_tokens": completion,
                      "total_tokens": it.prompt_tokens + completion}}
    return Outcome(it.custom_id, it.line, it.model, 200, response_body=body,
                   request_id=f"req-{it.custom_id}")
