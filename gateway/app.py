"""The aiohttp application: one factory, one route table, state opened and closed in `cleanup_ctx`.

`create_app(cfg, executor)` wires SQLite, the file store, the batch service and the executor. On
startup it takes the state dir's lock (`gateway.state_dir`: one gateway per state dir) before it opens
or resumes anything, then resumes every live batch; on shutdown it closes the executor first (no more outcomes), then
stops the runners, so a batch in progress keeps its status and resumes with the next app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator, Callable

from aiohttp import web

from gateway import batches_views, events_views, file_expiry, files_views, ui
from gateway.auth import auth_middleware
from gateway.batches import BatchService
from gateway.errors import error_middleware
from gateway.events import BatchEvents
from gateway.filestore import FileStore
from gateway.logs import request_id_middleware
from gateway.looplag import LoopLagMonitor
from gateway.metrics import GatewayMetrics
from gateway.openapi import openapi_json
from gateway.outbox import Outbox
from gateway.responses import json_response
from gateway.state import CONFIG, DB, EVENTS, METRICS, SERVICE, STORE
from gateway.state_dir import StateDirLock, open_database
from gateway.webhooks import WebhookSender
from runtime.config import Config
from runtime.executor_api import Executor

log = logging.getLogger("samullm.gateway")
CONTROL_BODY_LIMIT = 1 << 20  # JSON bodies; uploads stream and have their own limit


async def health(request: web.Request) -> web.Response:
    body: dict = {"status": "ok"}
    service = request.app.get(SERVICE)
    if service is not None:
        body.update(service.executor.health())
    return json_response(body)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def models(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG]
    # `endpoints` (an extension the SDK passes through): the batch endpoints the model serves
    data = [{"id": m.name, "object": "model", "created": 0, "owned_by": "samullm",
             "endpoints": list(m.served_endpoints)} for m in cfg.models]
    return json_response({"object": "list", "data": data})


ROUTES = [
    web.get("/health", health),
    web.get("/metrics", metrics),
    web.get("/v1/models", models),
    web.get("/openapi.json", openapi_json),
    web.post("/v1/files", files_views.upload),
    web.get("/v1/files", files_views.list_files),
    web.get("/v1/files/{file_id}", files_views.retrieve),
    web.get("/v1/files/{file_id}/content", files_views.content),
    web.delete("/v1/files/{file_id}", files_views.delete),
    web.post("/v1/batches", batches_views.create),
    web.get("/v1/batches", batches_views.list_batches),
    web.get("/v1/batches/{batch_id}", batches_views.retrieve),
    web.get("/v1/batches/{batch_id}/events", events_views.list_events),
    web.post("/v1/batches/{batch_id}/cancel", batches_views.cancel),
]


def create_app(cfg: Config, executor: Executor, *,
               clock: Callable[[], float] = time.time,
               expiry_interval_s: float = 5.0, lock: StateDirLock | None = None,
               on_live_batches: Callable[[int], None] | None = None) -> web.Application:
    """The gateway app. It owns `executor` (closes it on shutdown; `cli.serve` builds the real one).
    `lock`:
    the state dir's lock when the caller took it already (`samullm serve`, before binding).
    `on_live_batches`: told the number of live batches (validating, in progress, finalizing)
    whenever it changes (`samullm serve`: the executor's background profiling stops for them)."""
    app = web.Application(middlewares=[request_id_middleware, error_middleware,
                                       auth_middleware(cfg.auth.api_keys)],
                          client_max_size=CONTROL_BODY_LIMIT)
    app[CONFIG] = cfg
    app.router.add_routes(ROUTES)
    app.router.add_routes(ui.ROUTES)  # the status page (HTML: not in openapi.json)

    async def state(app: web.Application) -> AsyncIterator[None]:
        state_dir = cfg.state_dir
        own_lock = StateDirLock(state_dir).acquire() if lock is None else None
        try:
            db = open_database(state_dir)
            store = FileStore(state_dir / "files")
            store.sweep(known=db.file_ids())  # before anything resumes
            ex = executor
            gm = GatewayMetrics()
            service = BatchService(cfg, db, store, ex, gm, clock, on_live_batches)
            gm.bind(db.count_by_status, service.queue_depth,
                    lambda: len(ex.health().get("idle_engines", ())))
            gm.bind_sleeping(lambda: len(ex.health().get("sleeping_engines", ())))
            gm.bind_nodes(lambda: ex.health().get("nodes") or [])
            outbox = Outbox(db, cfg.webhooks)  # hooked before a resumed batch can end
            sender = WebhookSender(outbox, cfg.webhooks, gm)
            gm.bind_webhooks(outbox.count_pending)
            app[DB], app[STORE], app[METRICS], app[SERVICE] = db, store, gm, service
            app[EVENTS] = events = BatchEvents(db)
            ex.listen(events.record)  # before anything runs: a batch's first events are kept
            ex.listen(gm.observe_event)
            lag = LoopLagMonitor(gm.registry)
            await ex.start()
            await service.start()
            await sender.start()
            lag.start()
            try:
                yield
            finally:
                await lag.stop()
                await service.close()  # stops runners, then closes the executor
                events.close()  # the last events written
                await sender.close()  # attempts under way stay pending for the next start
                db.close()
        finally:
            if own_lock is not None:
                own_lock.release()

    async def expiry(app: web.Application) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                try:
                    app[SERVICE].expire_due()
                except Exception:  # keep expiring later batches even if one check failed
                    log.exception("expiry check failed")
                try:  # expired files: content and row (kept while a live batch reads its input)
                    file_expiry.sweep(app[DB], app[STORE], app[SERVICE].now())
                except Exception:
                    log.exception("file expiry sweep failed")
                await asyncio.sleep(expiry_interval_s)

        task = asyncio.create_task(loop(), name="expiry")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(state)
    app.cleanup_ctx.append(expiry)
    return app
