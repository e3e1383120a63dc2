"""Webhook delivery: the outbox's pending events POSTed to their endpoints, signed as OpenAI signs
its webhooks (Standard Webhooks), retried with exponential backoff for a bounded time.

Headers: `webhook-id` (the outbox row's, the same on every attempt), `webhook-timestamp` (unix
seconds of this attempt) and `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`
keyed with the base64-decoded part of the endpoint's `whsec_…` secret: what
`openai.OpenAI().webhooks.unwrap(body, headers, secret=...)` verifies.

One task (`WebhookSender.start`) picks due rows and runs at most `CONCURRENCY` attempts, each its
own task with the endpoint's `timeout_s`: a hanging receiver holds one attempt, never the API or
other endpoints. A 2xx answer delivers; anything else (an error status, a refused connection, a
timeout) is a failed attempt, retried after `retry_first_s` doubled per attempt up to
`retry_max_s`, until `retry_for_s` after the status change: then the event is given up and logged.
At start every pending event is due at once (what a stopped gateway left, or a crash between the
status change and the delivery).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import time
from typing import Any, Callable, Sequence

import aiohttp

from gateway.metrics import GatewayMetrics
from gateway.outbox import Outbox
from runtime.config import WebhookConfig

log = logging.getLogger("samullm.webhooks")
CONCURRENCY = 8  # attempts under way at once, over all endpoints
LEASE_SLACK_S = 5.0  # an attempt's row is not due again before its timeout plus this


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for `body` under a `whsec_…` secret."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def backoff_s(ep: WebhookConfig, attempts: int) -> float:
    """Wait after the `attempts`-th failed attempt (1, 2, ...)."""
    return min(ep.retry_max_s, ep.retry_first_s * 2 ** min(attempts - 1, 62))


class WebhookSender:
    """Delivers what `outbox` holds. `clock`: wall seconds (the signature's timestamp is checked
    against the receiver's wall clock, so it is never the gateway's injected batch clock)."""

    def __init__(self, outbox: Outbox, endpoints: Sequence[WebhookConfig],
                 metrics: GatewayMetrics, clock: Callable[[], float] = time.time) -> None:
        self.outbox, self.metrics, self.clock = outbox, metrics, clock
        self.endpoints = {ep.url: ep for ep in endpoints}
        self._wake = asyncio.Event()
        self._attempts: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        outbox.on_recorded = self._wake.set

    async def start(self) -> None:
        n = self.outbox.retry_all_now()
        if n:
            log.info("%d webhook event(s) pending from before the start; delivering", n)
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": "samullm-webhooks", "Content-Type": "application/json"})
        self._task = asyncio.create_task(self._loop(), name="webhooks")

    async def close(self) -> None:
        """Stop at once: attempts under way are abandoned and stay pending for the next start."""
        tasks = [t for t in (self._task, *self._attempts.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                self._start_due()
            except Exception:  # a database hiccup: try again on the next wake-up or in a while
                log.exception("webhook delivery: picking due events failed")
            await self._sleep()

    def _start_due(self) -> None:
        room = CONCURRENCY - len(self._attempts)
        if room <= 0:
            return
        now = self.clock()
        for row in self.outbox.due(now, room):
            wid = row["webhook_id"]
            if wid in self._attempts:
                continue
            ep = self.endpoints.get(row["url"])
            if ep is None:
                log.warning("webhook %s (%s of %s): %s is no longer configured; given up", wid,
                            row["event_type"], row["batch_id"], row["url"])
                self.outbox.give_up(wid, "endpoint no longer configured")
                self.metrics.webhooks.labels("gave_up").inc()
                continue
            self.outbox.lease(wid, now + ep.timeout_s + LEASE_SLACK_S)
            self._attempts[wid] = asyncio.create_task(self._attempt(row, ep),
                                                      name=f"webhook-{wid}")

    async def _sleep(self) -> None:
        """Until woken (a new event, an attempt done) or the next row is due."""
        timeout = None
        if len(self._attempts) < CONCURRENCY:
            nxt = self.outbox.next_due()
            if nxt is not None:
                timeout = max(0.0, nxt - self.clock())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _attempt(self, row: dict[str, Any], ep: WebhookConfig) -> None:
        wid = row["webhook_id"]
        try:
            error = await self._post(row, ep)
            self._settle(row, ep, error)
        except Exception:
            log.exception("webhook %s: recording the attempt failed", wid)
        finally:
            self._attempts.pop(wid, None)
            self._wake.set()

    async def _post(self, row: dict[str, Any], ep: WebhookConfig) -> str | None:
        """One attempt; None when the receiver answered 2xx, else what went wrong."""
        assert self._session is not None
        body, ts = bytes(row["payload"]), int(self.clock())
        headers = {"webhook-id": row["webhook_id"], "webhook-timestamp": str(ts),
                   "webhook-signature": sign(ep.secret, row["webhook_id"], ts, body)}
        try:
            async with self._session.post(ep.url, data=body, headers=headers, allow_redirects=False,
                                          timeout=aiohttp.ClientTimeout(total=ep.timeout_s)) as r:
                return None if 200 <= r.status < 300 else f"HTTP {r.status}"
        except asyncio.TimeoutError:
            return f"no answer within {ep.timeout_s:g} s"
        except aiohttp.ClientError as exc:
            return f"{type(exc).__name__}: {exc}"

    def _settle(self, row: dict[str, Any], ep: WebhookConfig, error: str | None) -> None:
        wid, what = row["webhook_id"], f"{row['event_type']} of {row['batch_id']}"
        if error is None:
            self.outbox.delivered(wid)
            self.metrics.webhooks.labels("delivered").inc()
            log.info("webhook %s (%s) delivered to %s", wid, what, ep.url)
            return
        self.metrics.webhooks.labels("failed").inc()
        attempts, now = row["attempts"] + 1, self.clock()
        next_at = now + backoff_s(ep, attempts)
        if next_at > row["enqueued_at"] + ep.retry_for_s:
            self.outbox.attempt_failed(wid, error, None)
            self.metrics.webhooks.labels("gave_up").inc()
            log.error("webhook %s (%s) to %s given up after %d attempts over %.0f s: %s", wid,
                      what, ep.url, attempts, now - row["enqueued_at"], error)
            return
        self.outbox.attempt_failed(wid, error, next_at)
        log.warning("webhook %s (%s) to %s: attempt %d failed (%s); next in %.1f s", wid, what,
                    ep.url, attempts, error, next_at - now)
