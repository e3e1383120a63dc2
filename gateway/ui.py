"""The status page: a static shell at `/` and `/ui` and two HTML fragments its script fetches.

The shell (`gateway/static/status.{html,js,css}`) holds no data and is served without a key
(`gateway.auth.PUBLIC_PATHS`). Its
script asks for the API key when the gateway wants one, keeps it in `sessionStorage`, and sends it
as `Authorization: Bearer` on every fetch; the key is never in a URL or a cookie. The fragments are
API routes like any other (the auth middleware answers 401 without a valid key, and a key sees only
its own batches): `GET /ui/fragments/batches` (the key's latest batches: status, per-model progress,
predicted completion) and `GET /ui/fragments/batches/{batch_id}` (one batch: progress, the Gantt
chart of its plan and engines, its events, its files). They read the same objects as the JSON API
(`BatchService.view`, `BatchEvents.page`) and render them server-side (`gateway.ui_html`,
`gateway.ui_svg`). A batch page is at `/ui#<batch_id>`; the script polls every few seconds.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from gateway.auth import OWNER
from gateway.events import MAX_EVENTS_PER_BATCH
from gateway.state import DB, EVENTS, SERVICE
from gateway.ui_html import batch_list, batch_page

STATIC = Path(__file__).parent / "static"
LIST_LIMIT = 50
HTML = "text/html; charset=utf-8"
NO_STORE = {"Cache-Control": "no-store"}  # a key's data is not kept by the browser or a proxy


def _static(name: str, content_type: str) -> web.Response:
    return web.Response(body=(STATIC / name).read_bytes(), headers={
        "Content-Type": content_type, "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


async def shell(request: web.Request) -> web.Response:
    return _static("status.html", HTML)


async def script(request: web.Request) -> web.Response:
    return _static("status.js", "text/javascript; charset=utf-8")


async def style(request: web.Request) -> web.Response:
    return _static("status.css", "text/css; charset=utf-8")


async def list_fragment(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    rows, more = request.app[DB].list_batches(request[OWNER], after=None, limit=LIST_LIMIT)
    html = batch_list([service.view(r) for r in rows], service.clock(), more)
    return web.Response(text=html, content_type="text/html", headers=NO_STORE)


async def batch_fragment(request: web.Request) -> web.Response:
    service, batch_id = request.app[SERVICE], request.match_info["batch_id"]
    row = request.app[DB].get_batch(batch_id, request[OWNER])  # 404: unknown or another key's
    events, _ = request.app[EVENTS].page(batch_id, after=None, limit=MAX_EVENTS_PER_BATCH)
    html = batch_page(service.view(row), events, service.clock())
    return web.Response(text=html, content_type="text/html", headers=NO_STORE)


ROUTES = [
    web.get("/", shell),
    web.get("/ui", shell),
    web.get("/ui/status.js", script),
    web.get("/ui/status.css", style),
    web.get("/ui/fragments/batches", list_fragment),
    web.get("/ui/fragments/batches/{batch_id}", batch_fragment),
]
