"""Logging: request ids, one access line per request, and the `[server].log_json` formatter.

`request_id_middleware` gives every request an id (the client's `X-Request-Id` when it is a short
printable token, else a fresh `req_…`), returns it in the `x-request-id` response header, and makes it
visible to every log record emitted while the request is handled (a context variable read by
`RequestIdFilter`). The access line names method, path, status, duration and the owner *tag* (a hash):
API keys and the Authorization header are never logged.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
import time
from typing import Awaitable, Callable

from aiohttp import web

from gateway.auth import OWNER

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id",
                                                                         default=None)
HEADER = "x-request-id"
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")  # safe to echo and to log
access_log = logging.getLogger("samullm.access")


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


@web.middleware
async def request_id_middleware(request: web.Request,
                                handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                                ) -> web.StreamResponse:
    given = request.headers.get(HEADER, "")
    rid = given if _CLIENT_ID.match(given) else new_request_id()
    token = REQUEST_ID.set(rid)
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)  # the error middleware inside turns errors into answers
        status = response.status
        response.headers[HEADER] = rid
        return response
    except web.HTTPException as exc:  # redirects and the like pass through the error middleware
        status = exc.status
        raise
    finally:
        owner = request.get(OWNER)  # a hash tag, never the key
        access_log.info("%s %s %d %.1fms", request.method, request.path, status,
                        (time.perf_counter() - start) * 1000,
                        extra={"method": request.method, "path": request.path, "status": status,
                               "duration_ms": round((time.perf_counter() - start) * 1000, 2),
                               "owner": owner})
        REQUEST_ID.reset(token)


class RequestIdFilter(logging.Filter):
    """Stamps `record.request_id` (None outside a request) so every formatter can print it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


_EXTRA = ("method", "path", "status", "duration_ms", "owner")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: t, level, logger, msg, request_id, access fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"t": round(record.created, 3), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage(), "request_id": getattr(record, "request_id", None)}
        for k in _EXTRA:
            if hasattr(record, k):
                out[k] = getattr(record, k)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def setup_logging(log_json: bool, level: int = logging.INFO) -> logging.Handler:
    """Configure the root logger once (stderr): JSON lines or text, both with request ids."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_json else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
