"""`/v1/batches`: create, retrieve, list, cancel."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.auth import ANONYMOUS, OWNER
from gateway.batches import QueueFull
from gateway.errors import bad_request, conflict, queue_limit_exceeded
from gateway.file_expiry import expiry_seconds
from gateway.lines import count_lines
from gateway.responses import json_response
from gateway.state import CONFIG, DB, SERVICE, STORE
from gateway.validation import SUPPORTED_ENDPOINTS
from gateway.views_util import int_param, list_page
from runtime.config import STRATEGIES

META_KEYS, META_KEY_LEN, META_VALUE_LEN = 16, 64, 512
STRATEGY_KEY = "strategy"  # metadata key choosing the planning strategy (our extension)


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # too deep: not for us
        raise bad_request("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def _check_metadata(meta: Any) -> dict[str, str] | None:
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise bad_request("`metadata` must be an object of strings.", param="metadata")
    if len(meta) > META_KEYS:
        raise bad_request(f"`metadata` may have at most {META_KEYS} keys.", param="metadata")
    for k, v in meta.items():
        if len(k) > META_KEY_LEN:
            raise bad_request(f"metadata key {k[:20]!r}… is longer than {META_KEY_LEN} characters.",
                              param="metadata")
        if not isinstance(v, str) or len(v) > META_VALUE_LEN:
            raise bad_request(f"metadata value of {k!r} must be a string of at most "
                              f"{META_VALUE_LEN} characters.", param="metadata")
    if STRATEGY_KEY in meta and meta[STRATEGY_KEY] not in STRATEGIES:
        raise bad_request(f"metadata.{STRATEGY_KEY} must be one of {', '.join(STRATEGIES)}.",
                          param=f"metadata.{STRATEGY_KEY}")
    return dict(meta)


def _required_str(body: dict[str, Any], name: str) -> str:
    v = body.get(name)
    if v is None:
        raise bad_request(f"Missing required parameter: '{name}'.", param=name,
                          code="missing_required_parameter")
    if not isinstance(v, str) or not v:
        raise bad_request(f"`{name}` must be a non-empty string.", param=name)
    return v


async def create(request: web.Request) -> web.Response:
    body = await _json_body(request)
    cfg, owner = request.app[CONFIG], request[OWNER]
    input_file_id = _required_str(body, "input_file_id")
    endpoint = _required_str(body, "endpoint")
    if endpoint not in SUPPORTED_ENDPOINTS:  # refused now, not a batch that fails later
        raise bad_request(f"Invalid endpoint {endpoint[:80]!r}; this gateway serves "
                          f"{', '.join(SUPPORTED_ENDPOINTS)}.", param="endpoint",
                          code="unsupported_endpoint")
    window = _required_str(body, "completion_window")
    if window not in cfg.limits.completion_windows:
        raise bad_request(f"Invalid completion_window {window!r}; allowed: "
                          f"{', '.join(cfg.limits.completion_windows)}.",
                          param="completion_window", code="invalid_completion_window")
    metadata = _check_metadata(body.get("metadata"))
    output_expires = expiry_seconds(body.get("output_expires_after"), "output_expires_after")
    service = request.app[SERVICE]
    # 404 for an unknown, expired or another key's file
    f = request.app[DB].get_file(input_file_id, owner, service.now())
    if f["purpose"] != "batch":
        raise bad_request(f"File {input_file_id} has purpose {f['purpose']!r}; a batch input needs "
                          "purpose 'batch'.", param="input_file_id", code="invalid_file_purpose")
    lines = None
    if cfg.limits.max_queued_requests_per_key:
        lines = await asyncio.to_thread(_input_lines, request.app[STORE].path(input_file_id))
        request.app[DB].get_file(input_file_id, owner)  # not deleted while it was counted
    try:
        row = service.create(owner, input_file_id, endpoint, window, metadata,
                             (metadata or {}).get(STRATEGY_KEY), lines)
    except QueueFull as full:
        who = ("this gateway (no [auth].api_keys: every caller shares one queue)"
               if owner == ANONYMOUS else "this API key")
        raise queue_limit_exceeded(full.limit, full.queued, full.new, who) from None
    if output_expires is not None:  # no await since the create: its runner has not run yet
        request.app[DB].update_batch(row["id"], output_expires_after=output_expires)
    return json_response(service.view(row))


def _input_lines(path: Path) -> int:
    """The input's requests as the queue limit counts them; 0 when its content is gone from disk
    (the batch then fails as input_file_missing, as without a limit)."""
    try:
        return count_lines(path)
    except FileNotFoundError:
        return 0


async def retrieve(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    row = request.app[DB].get_batch(request.match_info["batch_id"], request[OWNER])
    return json_response(service.view(row))


async def list_batches(request: web.Request) -> web.Response:
    limit = int_param(request.query, "limit", 20, 1, 100)
    service = request.app[SERVICE]
    rows, more = request.app[DB].list_batches(request[OWNER],
                                             after=request.query.get("after") or None, limit=limit)
    return json_response(list_page([service.view(r) for r in rows], more))


async def cancel(request: web.Request) -> web.Response:
    service, batch_id = request.app[SERVICE], request.match_info["batch_id"]
    row = service.cancel(batch_id, request[OWNER])
    if row is None:
        status = request.app[DB].get_batch(batch_id)["status"]
        raise conflict(f"Cannot cancel a batch with status '{status}'.")
    return json_response(service.view(row))


