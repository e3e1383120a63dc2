"""API keys: `Authorization: Bearer <key>` checked in constant time against every configured key.

Objects belong to the key that made them (its `owner` tag, a hash, so the database never holds keys);
another key gets 404 as if the object did not exist. With no keys configured every caller is the same
anonymous owner, which is why `check_bind` refuses such a server on a non-loopback address.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Awaitable, Callable

from aiohttp import web

from gateway.errors import ApiError, render
from runtime.config import ConfigError

OWNER = web.RequestKey("owner", str)
ANONYMOUS = "anonymous"
PUBLIC_PATHS = frozenset({"/health", "/metrics", "/openapi.json"})


def owner_tag(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def check_bind(host: str, api_keys: list[str]) -> None:
    """Refuse to serve without keys on anything but loopback (anyone could read everyone's data)."""
    if api_keys:
        return
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ConfigError(f"server.host: {host!r} is not a loopback address and [auth].api_keys is "
                      "empty; configure API keys to serve on the network")


def auth_middleware(api_keys: list[str]) -> Callable[..., Awaitable[web.StreamResponse]]:
    keys = [(k.encode(), owner_tag(k)) for k in api_keys]

    @web.middleware
    async def middleware(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        if not keys or request.path in PUBLIC_PATHS:
            request[OWNER] = ANONYMOUS
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        owner = None
        if scheme.lower() == "bearer":
            for key, tag in keys:  # no early exit: timing does not tell which key nearly matched
                if hmac.compare_digest(given.strip().encode(), key) and owner is None:
                    owner = tag
        if owner is None:
            msg = ("You didn't provide an API key." if not header
                   else "Incorrect API key provided.")
            return render(ApiError(401, msg, type="invalid_request_error", code="invalid_api_key"))
        request[OWNER] = owner
        return await handler(request)

    return middleware
