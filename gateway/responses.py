"""JSON responses encoded with orjson.

Every API answer goes through here: under load the gateway spent a tenth of its CPU in the standard
library's `json.dumps` (py-spy, `bench/load.py`); orjson is several times faster and emits the
same JSON for the plain dicts, lists, strings and numbers the API returns.
"""

from __future__ import annotations

from typing import Any, Mapping

import orjson
from aiohttp import web


def json_response(data: Any, *, status: int = 200,
                  headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS), status=status,
                        headers=headers, content_type="application/json")
