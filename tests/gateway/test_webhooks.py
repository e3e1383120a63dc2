"""Webhooks as OpenAI sends them: `batch.completed|failed|cancelled|expired` events signed per
Standard Webhooks, checked here by the official SDK's verifier (`client.webhooks.unwrap`) on a real
aiohttp receiver on loopback. The outbox is durable (written with the status change), retried with
backoff while the receiver is down, resumed by a restarted gateway, and never in the API's way."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import re
import socket
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from openai import OpenAI
from openai.types.webhooks import (BatchCancelledWebhookEvent, BatchCompletedWebhookEvent,
                                   BatchExpiredWebhookEvent, BatchFailedWebhookEvent)

from gateway.db import Database
from gateway.outbox import Outbox
from gateway.state import METRICS
from runtime.config import Config, ConfigError, parse_config

from .conftest import Clock, chat_line, jsonl, plan_only_config, poll, running

ASYNC = pytest.mark.asyncio(loop_scope="session")
CHAT = "/v1/chat/completions"
SECRET = "whsec_" + base64.b64encode(b"samullm-webhook-test-secret-32by").decode()
FAST = {"retry_first_s": 0.05, "retry_max_s": 0.2, "timeout_s": 2.0}
VERIFIER = OpenAI(api_key="unused")


class Receiver:
    """A webhook receiver: records every delivery; `mode` says how it answers (ok | 500 | hang)."""

    def __init__(self) -> None:
        self.got: list[tuple[dict[str, str], bytes, int]] = []  # (headers, body, status answered)
        self.mode = "ok"
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = 200 if self.mode == "ok" else 500
        self.got.append((dict(request.headers), body, status))
        if self.mode == "hang":
            await self.release.wait()
        return web.Response(status=status)

    def delivered(self) -> list[tuple[dict[str, str], bytes]]:
        return [(h, b) for h, b, s in self.got if s == 200]

    def events(self) -> list[Any]:
        """The delivered events, each through the SDK's verifier (it raises on a bad signature)."""
        return [VERIFIER.webhooks.unwrap(b, h, secret=SECRET) for h, b in self.delivered()]


@contextlib.asynccontextmanager
async def receiving(port: int = 0) -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield rec, f"http://127.0.0.1:{port}/hook"
    finally:
        rec.release.set()
        await runner.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hooked(state_dir: Path, *hooks: dict[str, Any]) -> Config:
    """The plan-only test config with `[[webhooks]]` entries (validated as the TOML would be)."""
    webhooks = parse_config({"webhooks": [{"secret": SECRET, **FAST, **h} for h in hooks]}).webhooks
    return dataclasses.replace(plan_only_config(state_dir), webhooks=webhooks)


async def until(cond: Any, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def batch(client: Any, lines: list[Any] | bytes, window: str = "24h") -> Any:
    data = lines if isinstance(lines, bytes) else jsonl(lines)
    f = await client.files.create(file=("in.jsonl", data), purpose="batch")
    return await client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window=window)


async def metric(srv: Any, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{srv.url}/metrics") as resp:
        text = await resp.text()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


# --- config ---------------------------------------------------------------------------------------
def test_config_defaults_and_checks() -> None:
    cfg = parse_config({"webhooks": [{"url": "https://example.com/h", "secret": SECRET}]})
    (w,) = cfg.webhooks
    assert w.events == ["batch.completed", "batch.failed", "batch.cancelled", "batch.expired"]
    assert w.retry_for_s == 86400 and w.timeout_s > 0
    bad = [({"secret": "sk-nope"}, "secret"), ({"secret": "whsec_%%%"}, "secret"),
           ({"secret": "whsec_"}, "secret"), ({"url": "ftp://x/h"}, "url"),
           ({"events": ["batch.done"]}, "events"), ({"events": []}, "events"),
           ({"retry_first_s": 0}, "retry_first_s"), ({"timeout_s": -1}, "timeout_s")]
    for change, key in bad:
        entry = {"url": "https://example.com/h", "secret": SECRET} | change
        with pytest.raises(ConfigError, match=rf"webhooks\[0\]\.{key}"):
            parse_config({"webhooks": [entry]})
    with pytest.raises(ConfigError, match=r"webhooks\[1\]\.url: duplicate"):
        parse_config({"webhooks": [{"url": "https://e.com/h", "secret": SECRET}] * 2})


# --- the outbox: in the transaction of the status change ------------------------------------------
def test_event_rows_commit_with_the_status_change_or_not_at_all(tmp_path: Path) -> None:
    cfg = hooked(tmp_path, {"url": "http://127.0.0.1:1/a"},
                 {"url": "http://127.0.0.1:1/b", "events": ["batch.failed"]})
    db = Database(tmp_path / "db.sqlite")
    outbox = Outbox(db, cfg.webhooks)
    row = {"id": "batch_1", "owner": "k", "endpoint": CHAT, "input_file_id": "file-1",
           "completion_window": "24h", "status": "finalizing", "created_at": 1,
           "request_counts": {"total": 0, "completed": 0, "failed": 0}, "model_request_counts": {}}
    db.insert_batch(row)
    db.insert_batch(row | {"id": "batch_2"})
    assert db.transition("batch_1", ["finalizing"], "completed", completed_at=1234)
    rows = outbox.pending()
    assert [(r["url"], r["event_type"], r["batch_id"]) for r in rows] == \
        [("http://127.0.0.1:1/a", "batch.completed", "batch_1")]  # /b takes batch.failed only
    assert b'"created_at":1234' in rows[0]["payload"]
    # a transition the compare-and-set refuses records nothing
    assert not db.transition("batch_1", ["finalizing"], "completed", completed_at=1)
    assert len(outbox.pending()) == 1
    # a failing outbox write undoes the status change with it
    db.execute("DROP TABLE webhook_outbox")
    with pytest.raises(Exception):
        db.transition("batch_2", ["finalizing"], "completed", completed_at=1)
    assert db.get_batch("batch_2")["status"] == "finalizing"
    db.close()


# --- delivery -------------------------------------------------------------------------------------
@ASYNC
async def test_each_event_is_delivered_signed_as_openai_does(tmp_path: Path) -> None:
    clock = Clock()
    async with receiving() as (rec, url), receiving() as (only, url2):
        cfg = hooked(tmp_path / "state", {"url": url},
                     {"url": url2, "events": ["batch.completed"]})
        async with running(cfg, clock=clock, expiry_interval_s=0.02) as srv:
            client = srv.client()
            done = await poll(client, (await batch(client, [chat_line("a")])).id)
            failed = await poll(client, (await batch(client, b"not json\n")).id)
            srv.executor.hold()
            b = await batch(client, [chat_line("a")])
            await poll(client, b.id, lambda x: x.status == "in_progress")
            await client.batches.cancel(b.id)
            cancelled = await poll(client, b.id)
            b = await batch(client, [chat_line("a")], window="1h")
            await poll(client, b.id, lambda x: x.status == "in_progress")
            clock.offset = 3601
            expired = await poll(client, b.id)
            assert [x.status for x in (done, failed, cancelled, expired)] == \
                ["completed", "failed", "cancelled", "expired"]
            await until(lambda: len(rec.delivered()) == 4 and len(only.delivered()) == 1)
            await asyncio.sleep(0.1)
            assert len(rec.got) == 4 and len(only.got) == 1  # no duplicates when all went well
            events = {e.data.id: e for e in rec.events()}
            assert await metric(srv, "samullm_webhook_pending") == 0
            assert await metric(srv, 'samullm_webhook_deliveries_total{result="delivered"}') == 5
    for bt, cls, stamp in ((done, BatchCompletedWebhookEvent, done.completed_at),
                           (failed, BatchFailedWebhookEvent, failed.failed_at),
                           (cancelled, BatchCancelledWebhookEvent, cancelled.cancelled_at),
                           (expired, BatchExpiredWebhookEvent, expired.expired_at)):
        e = events[bt.id]
        assert isinstance(e, cls) and e.object == "event" and e.id.startswith("evt_")
        assert e.created_at == stamp
    (h, body), = only.delivered()
    assert VERIFIER.webhooks.unwrap(body, h, secret=SECRET).data.id == done.id
    assert h["Content-Type"] == "application/json"
    # the event is one event: both endpoints got the same id, each under its own webhook-id
    assert events[done.id].id == VERIFIER.webhooks.unwrap(body, h, secret=SECRET).id
    assert h["webhook-id"] not in {hh["webhook-id"] for hh, _ in rec.delivered()}


@ASYNC
async def test_receiver_down_for_a_while_gets_every_event_under_one_webhook_id(tmp_path) -> None:
    port = free_port()
    cfg = hooked(tmp_path / "state", {"url": f"http://127.0.0.1:{port}/hook"})
    async with running(cfg) as srv:
        client = srv.client()
        ids = {(await poll(client, (await batch(client, data)).id)).id
               for data in ([chat_line("a")], b"not json\n", [chat_line("b")])}
        # connections refused: retried with backoff, still pending
        await until(lambda: _failed(srv) >= 6)
        assert await metric(srv, "samullm_webhook_pending") == 3
        async with receiving(port) as (rec, _):
            rec.mode = "500"  # up, but failing for a while
            await until(lambda: len(rec.got) >= 6)
            rec.mode = "ok"
            await until(lambda: len(rec.delivered()) == 3)
            await asyncio.sleep(0.3)
            assert {e.data.id for e in rec.events()} == ids and len(rec.delivered()) == 3
            by_id: dict[str, set[bytes]] = {}
            for h, body, _ in rec.got:
                by_id.setdefault(h["webhook-id"], set()).add(body)
            # every attempt of an event: the same webhook-id and body (so a receiver can dedupe)
            assert len(by_id) == 3 and all(len(bodies) == 1 for bodies in by_id.values())
            assert {h["webhook-id"] for h, _ in rec.delivered()} == set(by_id)
            assert await metric(srv, "samullm_webhook_pending") == 0


def _failed(srv: Any) -> float:
    """Failed delivery attempts so far (the live counter, read without a request)."""
    return srv.app[METRICS].webhooks.labels("failed")._value.get()


@ASYNC
async def test_restarted_gateway_delivers_what_was_pending(tmp_path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    state = tmp_path / "state"
    slow = hooked(state, {"url": url, "retry_first_s": 3600.0, "retry_max_s": 3600.0})
    async with running(slow) as srv:
        client = srv.client()
        b = await poll(client, (await batch(client, [chat_line("a")])).id)
        await until(lambda: _failed(srv) >= 1)  # refused once; next try in an hour
        assert await metric(srv, "samullm_webhook_pending") == 1
    async with receiving(port) as (rec, _):
        async with running(slow) as srv2:  # the same backoff: the restart itself retries
            await until(lambda: len(rec.delivered()) == 1)
            (e,) = rec.events()
            assert isinstance(e, BatchCompletedWebhookEvent) and e.data.id == b.id
            assert await metric(srv2, "samullm_webhook_pending") == 0


@ASYNC
async def test_an_event_is_given_up_after_retry_for_s(tmp_path) -> None:
    url = f"http://127.0.0.1:{free_port()}/hook"
    cfg = hooked(tmp_path / "state", {"url": url, "retry_for_s": 0.3})
    async with running(cfg) as srv:
        client = srv.client()
        await poll(client, (await batch(client, [chat_line("a")])).id)
        await until(lambda: srv.app[METRICS].webhooks.labels("gave_up")._value.get() == 1)
        assert 2 <= _failed(srv) <= 6  # 0.05 + 0.1 + 0.2 s of backoff fit in 0.3 s, then no more
        assert await metric(srv, "samullm_webhook_pending") == 0
        failed_attempts = _failed(srv)
        await asyncio.sleep(0.3)
        assert _failed(srv) == failed_attempts


@ASYNC
async def test_api_stays_responsive_while_a_receiver_hangs(tmp_path) -> None:
    async with receiving() as (rec, url):
        rec.mode = "hang"
        cfg = hooked(tmp_path / "state", {"url": url, "timeout_s": 30.0})
        async with running(cfg) as srv:
            client = srv.client()
            await poll(client, (await batch(client, [chat_line("a")])).id)
            await until(lambda: len(rec.got) == 1)  # the delivery now hangs
            t0 = time.monotonic()
            for _ in range(5):
                b = await poll(client, (await batch(client, [chat_line("b")])).id)
                assert b.status == "completed"
                await client.batches.list()
            assert time.monotonic() - t0 < 5.0
        # the gateway shut down with deliveries hanging; they stay pending for the next start
    db = Database(tmp_path / "state" / "samullm.db")
    assert len(Outbox(db, cfg.webhooks).pending()) == 6
    db.close()
