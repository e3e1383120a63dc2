"""Logging: request ids, one access line per request, and the `[server].log_json` formatter.

`request_id_middleware` gives every request an id (the client's `X-Request-Id` when it is a short
printable token, else a fresh `req_…`), returns it in the `x-request-id` response header, and makes it
visible to every log record emitted while the request is handled (a context variable read by
`RequestIdFilter`). The access line names method, path, status, duration and the owner *tag* (a hash):
API keys and the Authorization header are never logged. Method and path are logged with control and
other non-printable characters escaped, so a request is one line and cannot forge another.
`RedactSecrets`, on aiohttp's loggers from import on, strips keys from what aiohttp logs itself.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
import time
from typing import Awaitable, Callable

from aiohttp import log as aiohttp_log
from aiohttp import web

from gateway.auth import CONFIGURED_KEYS, OWNER

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id",
                                                                         default=None)
HEADER = "x-request-id"
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")  # safe to echo and to log
access_log = logging.getLogger("samullm.access")


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def printable(s: str) -> str:
    """`s` with backslashes and non-printable characters (controls, line and paragraph separators,
    lone surrogates) written as Python escapes: a decoded `%0A` in a path is `\\n` in the log."""
    if s.isprintable() and "\\" not in s:
        return s
    return "".join(c if c.isprintable() and c != "\\" else
                   c.encode("unicode_escape").decode("ascii") for c in s)


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
        method, path = printable(request.method), printable(request.path)
        access_log.info("%s %s %d %.1fms", method, path, status,
                        (time.perf_counter() - start) * 1000,
                        extra={"method": method, "path": path, "status": status,
                               "duration_ms": round((time.perf_counter() - start) * 1000, 2),
                               "owner": owner})
        REQUEST_ID.reset(token)


# An Authorization value, to the end of its line (a CR/LF, or in a repr'd chunk the escapes \r, \n
# or its closing quote); a credential after an auth scheme, with the \xNN escapes of a repr'd
# non-ASCII one (aiohttp may quote a header's value without its name)
_AUTH_VALUE = re.compile(r"(?i)(authorization\s*[:=]\s*)(?:\\x[0-9a-f]{2}|\\[^rn]|[^\r\n\\'\"])+")
_SCHEME_CREDENTIAL = re.compile(r"(?i)\b((?:bearer|basic|token)\s+)(?:\\x[0-9a-f]{2}|[^\s'\"\\])+")
REDACTED = "[redacted]"


def redact(text: str) -> str:
    text = _AUTH_VALUE.sub(r"\1" + REDACTED, _SCHEME_CREDENTIAL.sub(r"\1" + REDACTED, text))
    for key in CONFIGURED_KEYS:
        for form in (key, repr(key.encode())[2:-1]):  # as text, and as in a repr of the bytes
            if form in text:
                text = text.replace(form, REDACTED)
    return text


class RedactSecrets(logging.Filter):
    """Strips Authorization values, bearer tokens and configured keys from a record's message and
    exception text. aiohttp, when it cannot parse a request, logs the exception ("Error handling
    request", `web_protocol.RequestHandler.handle_error`), and the exception's message quotes the
    raw bytes it failed on (`_http_parser.pyx` `parser_error_from_errno` repr()s the header line,
    `Authorization: Bearer sk-…` included; the pure-Python parser's `InvalidHeader` the value; both
    parsers' `LineTooLong` its first 100 bytes). The traceback is kept, redacted, as `exc_text`;
    `exc_info` is dropped since the exception object quotes the bytes too. A logger's filter sees
    only records made on that logger, so it goes on each one."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
            clean = redact(msg)
            if clean != msg:
                record.msg, record.args = clean, None
            if record.exc_info:
                text = record.exc_text or logging.Formatter().formatException(record.exc_info)
                record.exc_info, record.exc_text = None, redact(text)
            elif record.exc_text:
                record.exc_text = redact(record.exc_text)
        except Exception:  # raise nothing inside aiohttp's error handling, let out nothing raw
            record.msg, record.args = "log record withheld: it could not be redacted", None
            record.exc_info = record.exc_text = None
        return True


_REDACT = RedactSecrets()


def install_redaction() -> None:
    """Idempotent. Run at import: every app (`create_app` imports this module) gets it, whether or
    not `setup_logging` ran (tests and embedders configure logging their own way)."""
    for logger in (aiohttp_log.access_logger, aiohttp_log.client_logger,
                   aiohttp_log.internal_logger, aiohttp_log.server_logger,
                   aiohttp_log.web_logger, aiohttp_log.ws_logger,
                   logging.getLogger("samullm.gateway")):  # error_middleware's tracebacks
        if _REDACT not in logger.filters:
            logger.addFilter(_REDACT)


install_redaction()


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
        elif record.exc_text:  # what RedactSecrets leaves in place of exc_info
            out["exc"] = record.exc_text
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
