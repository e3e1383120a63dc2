"""`GET /v1/batches/{batch_id}/events`: the batch's events, oldest first, paged like the other lists
(`limit`, `after`; `has_more`, `first_id`, `last_id`). Paging forward from the last id seen tails a
running batch. A batch of another key is a 404, as for the batch itself."""

from __future__ import annotations

from aiohttp import web

from gateway.auth import OWNER
from gateway.responses import json_response
from gateway.state import DB, EVENTS
from gateway.views_util import int_param, list_page

DEFAULT_LIMIT, MAX_LIMIT = 100, 1000


async def list_events(request: web.Request) -> web.Response:
    batch_id = request.match_info["batch_id"]
    limit = int_param(request.query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    request.app[DB].get_batch(batch_id, request[OWNER])  # 404 for unknown or another key's batch
    data, more = request.app[EVENTS].page(batch_id, after=request.query.get("after") or None,
                                         limit=limit)
    return json_response(list_page(data, more))
