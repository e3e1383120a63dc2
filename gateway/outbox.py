"""The webhook outbox: the events a batch's end causes, durable in SQLite until delivered.

`Outbox` hooks `Database.transition`: when a batch reaches a terminal status, one row per subscribed
`[[webhooks]]` endpoint is inserted inside the same transaction as the status change, so an event
is never lost (a crash after the commit leaves it pending) nor recorded for a move that did not
happen. A row is `pending` until a 2xx answer (`delivered`) or until its endpoint's `retry_for_s`
has passed (`failed`, given up). Its `webhook_id` and `payload` are fixed at insert: every attempt
sends the same `webhook-id` and body, so a receiver can drop duplicates. Delivery is
`gateway.webhooks`; this module only stores.

Event body, as OpenAI sends it (openai-python `types/webhooks/batch_*_webhook_event.py`):
`{"id": "evt_…", "object": "event", "type": "batch.completed", "created_at": <the batch's
completed_at>, "data": {"id": "batch_…"}}`.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Callable, Sequence

import orjson

from gateway import lifecycle as lc
from gateway.db import Database
from runtime.config import WebhookConfig

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
EVENT_OF = {lc.COMPLETED: "batch.completed", lc.FAILED: "batch.failed",
            lc.CANCELLED: "batch.cancelled", lc.EXPIRED: "batch.expired"}


def event_body(event_id: str, event_type: str, created_at: int, batch_id: str) -> bytes:
    return orjson.dumps({"id": event_id, "object": "event", "type": event_type,
                         "created_at": created_at, "data": {"id": batch_id}})


class Outbox:
    """The `webhook_outbox` table. `clock` (wall seconds) stamps rows and schedules attempts;
    `on_recorded` is called after rows are inserted (the sender wakes up; it runs only once the
    inserting code yields, after the commit)."""

    def __init__(self, db: Database, endpoints: Sequence[WebhookConfig],
                 clock: Callable[[], float] = time.time) -> None:
        self.db, self.endpoints, self.clock = db, list(endpoints), clock
        self.on_recorded: Callable[[], None] = lambda: None
        db.on_transition.append(self.record)

    def record(self, batch_id: str, status: str, fields: dict[str, Any]) -> None:
        """The `on_transition` hook: the event of a terminal status, once per subscribed endpoint."""
        event_type = EVENT_OF.get(status)
        targets = [ep for ep in self.endpoints if event_type in ep.events]
        if event_type is None or not targets:
            return
        now = self.clock()
        created_at = fields.get(lc.STAMP[status])
        body = event_body("evt_" + secrets.token_hex(16), event_type,
                          int(created_at if created_at is not None else now), batch_id)
        for ep in targets:
            self.db.execute(
                "INSERT INTO webhook_outbox (webhook_id, url, event_type, batch_id, payload, "
                "enqueued_at, state, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                ("wh_" + secrets.token_hex(16), ep.url, event_type, batch_id, body, now, PENDING,
                 now))
        self.on_recorded()

    # --- the sender's side ------------------------------------------------------------------------
    def pending(self) -> list[dict[str, Any]]:
        return self._rows("WHERE state = ? ORDER BY seq", (PENDING,))

    def due(self, now: float, limit: int) -> list[dict[str, Any]]:
        return self._rows("WHERE state = ? AND next_attempt_at <= ? ORDER BY next_attempt_at, seq "
                          "LIMIT ?", (PENDING, now, limit))

    def next_due(self) -> float | None:
        r = self.db.execute("SELECT MIN(next_attempt_at) FROM webhook_outbox WHERE state = ?",
                            (PENDING,)).fetchone()
        return None if r[0] is None else float(r[0])

    def count_pending(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM webhook_outbox WHERE state = ?",
                                   (PENDING,)).fetchone()[0])

    def retry_all_now(self) -> int:
        """At start: every pending event is due now (the receiver may be back; a restart is when
        an operator expects it to be tried). Returns how many."""
        return self.db.execute("UPDATE webhook_outbox SET next_attempt_at = ? WHERE state = ?",
                               (self.clock(), PENDING)).rowcount

    def lease(self, webhook_id: str, until: float) -> None:
        """Not due again before `until` while an attempt is under way (a crash mid-attempt makes it
        due again then)."""
        self.db.execute("UPDATE webhook_outbox SET next_attempt_at = ? WHERE webhook_id = ?",
                        (until, webhook_id))

    def delivered(self, webhook_id: str) -> None:
        self.db.execute("UPDATE webhook_outbox SET state = ?, attempts = attempts + 1, "
                        "delivered_at = ?, last_error = NULL WHERE webhook_id = ?",
                        (DELIVERED, self.clock(), webhook_id))

    def attempt_failed(self, webhook_id: str, error: str, next_at: float | None) -> None:
        """Count a failed attempt; retry at `next_at`, or give up (`failed`) when it is None."""
        if next_at is None:
            self.db.execute("UPDATE webhook_outbox SET state = ?, attempts = attempts + 1, "
                            "last_error = ? WHERE webhook_id = ?", (FAILED, error, webhook_id))
        else:
            self.db.execute("UPDATE webhook_outbox SET attempts = attempts + 1, last_error = ?, "
                            "next_attempt_at = ? WHERE webhook_id = ?", (error, next_at, webhook_id))

    def give_up(self, webhook_id: str, error: str) -> None:
        self.db.execute("UPDATE webhook_outbox SET state = ?, last_error = ? WHERE webhook_id = ?",
                        (FAILED, error, webhook_id))

    def _rows(self, where: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute(f"SELECT * FROM webhook_outbox {where}", args)]
