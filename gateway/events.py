"""Each batch's events (`GET /v1/batches/{id}/events`): what the executor reported for it, kept in
SQLite (`batch_events`) so that they outlive the process that ran the batch.

The executor reports every event as it emits it (`Executor.listen`), on the event loop. Writes are
coalesced: events are buffered and written in one transaction at most every FLUSH_S (a commit under
`synchronous=FULL` is an fsync, and a plan is one event for every batch of the pool), at once when a
batch ends (`batch_finished`, `batch_cancelled`), before a page is read, and on shutdown.

What a batch sees names that batch only: a plan's `batches_predicted_s` (every pooled batch's
predicted completion, in seconds from the plan) becomes this batch's `predicted_completion_s` and
`predicted_completion_at` (unix s), `pooled_with` the number of other batches pooled with it, and a
re-plan's reason naming another batch says "another batch": the ids of other keys' batches never
show. The latest prediction is also the batch's
`estimated_completion_at` (a column of `batches`; the view shows it until the batch ends).

Bound: at most MAX_EVENTS_PER_BATCH stored events a batch. A re-plan follows every event of the pool
(each engine start, each model finished, each arriving batch), so a long batch pooled with many
others gathers replans without end; past the bound the oldest replans are dropped first, keeping the
first plan, the latest ones and every engine and lifecycle event (the timeline of what ran stays
whole), and only when no replan is left the oldest events go.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any, Mapping, Sequence

import orjson

from gateway.db import Database, NotFound
from gateway.ids import new_event_id

log = logging.getLogger("samullm.events")
MAX_EVENTS_PER_BATCH = 1000
FLUSH_S = 0.25  # the longest an event waits in memory (and the ETA lags the plan)
MAX_PENDING = 100_000  # events kept while the store refuses them (a full disk); the oldest go
ENDS = ("batch_finished", "batch_cancelled")  # a batch's last events: written at once
PLANS = ("plan", "replan")


def batch_view(batch_id: str, event: Mapping[str, Any]) -> tuple[str, float, dict[str, Any]]:
    """(type, time, data) of an executor event as `batch_id` sees it (see the module docstring)."""
    data = {k: v for k, v in event.items() if k != "event"}
    t = float(data.get("time") or 0.0)
    predicted = data.pop("batches_predicted_s", None)
    if isinstance(predicted, Mapping) and isinstance(predicted.get(batch_id), (int, float)):
        left = float(predicted[batch_id])
        data["predicted_completion_s"] = left
        data["predicted_completion_at"] = round(t + left, 3)
    if isinstance(data.get("pooled_with"), (list, tuple)):
        data["pooled_with"] = len(data["pooled_with"])
    if isinstance(data.get("reasons"), (list, tuple)):
        data["reasons"] = [_own_reason(batch_id, r) for r in data["reasons"]]
    return str(event.get("event", "")), t, data


def _own_reason(batch_id: str, reason: Any) -> Any:
    """A pass reason naming a batch (`batch_submitted:<id>`, `batch_cancelled:<id>`) names another
    batch only as that."""
    kind, _, who = str(reason).partition(":")
    return f"{kind}:another batch" if kind.startswith("batch_") and who and who != batch_id \
        else reason


class BatchEvents:
    """The event store: `record` (the executor's listener), `page` (the view's read)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._pending: list[tuple[str, str, float, dict[str, Any]]] = []
        self._timer: asyncio.TimerHandle | None = None

    def record(self, batch_ids: Sequence[str], event: Mapping[str, Any]) -> None:
        """An `runtime.executor_api.EventSink`: never blocks, never raises."""
        try:
            for bid in batch_ids:
                kind, t, data = batch_view(bid, event)
                self._pending.append((bid, kind, t, data))
            del self._pending[:max(0, len(self._pending) - MAX_PENDING)]
            if event.get("event") in ENDS:
                self.flush()
            elif self._timer is None:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:  # no loop (a synchronous caller): write now
                    self.flush()
                else:
                    self._timer = loop.call_later(FLUSH_S, self.flush)
        except Exception:
            log.exception("could not record event %s", event.get("event"))

    def flush(self) -> None:
        """Write the buffered events in one transaction; kept for the next try if that fails."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        try:
            self._write(pending)
        except Exception as exc:
            log.warning("could not store %d batch events (%s); kept to try again", len(pending),
                        exc)
            self._pending[:0] = pending
            del self._pending[:max(0, len(self._pending) - MAX_PENDING)]

    def _write(self, pending: list[tuple[str, str, float, dict[str, Any]]]) -> None:
        eta: dict[str, int] = {}
        with self.db.tx():
            for bid, kind, t, data in pending:
                self.db.execute(
                    "INSERT INTO batch_events (id, batch_id, created_at, type, data) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (new_event_id(), bid, int(t), kind,
                     orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS, default=str)))
                at = data.get("predicted_completion_at")
                if kind in PLANS and isinstance(at, float) and math.isfinite(at):
                    eta[bid] = round(at)
            for bid, at in eta.items():
                self.db.execute("UPDATE batches SET estimated_completion_at = ? WHERE id = ?",
                                (at, bid))
            for bid in {p[0] for p in pending}:
                self._trim(bid)

    def _trim(self, batch_id: str) -> None:
        """Keep at most MAX_EVENTS_PER_BATCH: the oldest replans go first, then the oldest."""
        n = self.db.execute("SELECT COUNT(*) FROM batch_events WHERE batch_id = ?",
                            (batch_id,)).fetchone()[0]
        for only in ("AND type = 'replan'", ""):
            if n <= MAX_EVENTS_PER_BATCH:
                return
            n -= self.db.execute(
                f"DELETE FROM batch_events WHERE seq IN (SELECT seq FROM batch_events WHERE "
                f"batch_id = ? {only} ORDER BY seq LIMIT ?)",
                (batch_id, n - MAX_EVENTS_PER_BATCH)).rowcount

    def page(self, batch_id: str, *, after: str | None,
             limit: int) -> tuple[list[dict[str, Any]], bool]:
        """The batch's events after the event `after` (NotFound if it is not one of them), oldest
        first, as API objects; and whether more follow."""
        self.flush()
        where, args = "batch_id = ?", [batch_id]
        if after:
            r = self.db.execute("SELECT seq FROM batch_events WHERE id = ? AND batch_id = ?",
                                (after, batch_id)).fetchone()
            if r is None:
                raise NotFound("event", after)
            where += " AND seq > ?"
            args.append(r[0])
        rows = self.db.execute(
            f"SELECT id, created_at, type, data FROM batch_events WHERE {where} ORDER BY seq "
            "LIMIT ?", (*args, limit + 1)).fetchall()
        out = [{"id": r[0], "object": "batch.event", "created_at": r[1], "type": r[2],
                "data": orjson.loads(r[3])} for r in rows[:limit]]
        return out, len(rows) > limit

    def close(self) -> None:
        self.flush()
