"""OpenAI-shaped errors. Views raise `ApiError`; one middleware (`error_middleware`) renders every error,
ours or aiohttp's, as `{"error": {"message", "type", "param", "code"}}` with the right status."""

from __future__ import annotations

import errno
import logging
import sqlite3
from typing import Any, Awaitable, Callable

from aiohttp import web

from gateway.db import Conflict, NotFound
from gateway.responses import json_response

log = logging.getLogger("samullm.gateway")


class ApiError(Exception):
    """An error for the client. `type` follows OpenAI: invalid_request_error, authentication_error, ..."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def not_found(kind: str, obj_id: str) -> ApiError:
    return ApiError(404, f"No such {kind} object: {obj_id}", param="id", code="not_found")


def conflict(message: str) -> ApiError:
    # The SDK retries 409 by default; a state conflict never heals by retrying.
    return ApiError(409, message, headers={"x-should-retry": "false"})


def queue_limit_exceeded(limit: int, queued: int, new: int, who: str) -> ApiError:
    """A create past `[limits].max_queued_requests_per_key`. 429 with OpenAI's rate-limit shape
    (type `requests`, code `rate_limit_exceeded`; the SDK raises RateLimitError) and
    `x-should-retry: true`: it passes once queued batches finish. No `retry-after`: when they finish
    is the engines' pace, unknown here, and the SDK would block the caller for it. A batch larger
    than the whole limit never fits: 400 `too_many_tasks` (OpenAI's code for a file with too many
    requests), which retrying never heals."""
    field = "[limits].max_queued_requests_per_key"
    if new > limit:
        return ApiError(400, f"This batch has {new} requests, more than {who} may have queued at "
                        f"once ({limit}, {field}); split the input file into smaller batches.",
                        param="input_file_id", code="too_many_tasks")
    return ApiError(429, f"Queued request limit reached for {who}: {queued} requests queued in "
                    f"batches not yet finished, and this batch adds {new}; the limit is {limit} "
                    f"({field}). Try again once some of them have completed or been cancelled.",
                    type="requests", code="rate_limit_exceeded",
                    headers={"x-should-retry": "true"})


def render(err: ApiError) -> web.Response:
    return json_response(err.body(), status=err.status, headers=err.headers)


_HTTP_TYPES = {401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error"}


def disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT from the OS, or SQLite's own way of saying it."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return "database or disk is full" in str(exc)


@web.middleware
async def error_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as err:
        return render(err)
    except NotFound as err:
        return render(not_found(err.kind, err.obj_id))
    except Conflict as err:
        return render(conflict(str(err)))
    except web.HTTPException as exc:  # unknown route, wrong method, body too large
        if exc.status < 400:
            raise
        err = ApiError(exc.status, exc.reason,
                       type=_HTTP_TYPES.get(exc.status, "invalid_request_error"),
                       headers={"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None)
        if exc.status == 404:
            err.message = f"Unknown path: {request.method} {request.path}"
        return render(err)
    except (OSError, sqlite3.OperationalError) as exc:
        if not disk_full(exc):
            log.exception("unhandled error on %s %r", request.method, request.path)
            return render(ApiError(500, "Internal server error", type="server_error"))
        log.error("%s %r: %s", request.method, request.path, exc)  # operators must see this
        return render(ApiError(507, "The server is out of disk space; try again later.",
                               type="server_error", code="insufficient_storage"))
    except Exception:  # a bug, never user input: log it, answer 500 without internals
        log.exception("unhandled error on %s %r", request.method, request.path)
        return render(ApiError(500, "Internal server error", type="server_error"))
