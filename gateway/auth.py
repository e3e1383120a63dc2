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
# the status page's shell is public too: it holds no data (`gateway.ui`: its fragments need a key)
PUBLIC_PATHS = frozenset({"/health", "/metrics", "/openapi.json",
                          "/", "/ui", "/ui/status.js", "/ui/status.css"})
# Every key configured in this process, for `gateway.logs` to redact from log records: a key may
# reach one in any header (aiohttp quotes the raw request when it cannot parse it).
CONFIGURED_KEYS: set[str] = set()


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
    CONFIGURED_KEYS.update(api_keys)

    @web.middleware
    async def middleware(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        if not keys or request.path in PUBLIC_PATHS:
            request[OWNER] = ANONYMOUS
            return await handler(request)
        sent = request.headers.getall("Authorization", [])
        if len(sent) > 1:  # which one is meant is a guess (a proxy may have added one): refuse
            return render(ApiError(401, f"Send one Authorization header; this request has "
                                   f"{len(sent)}.", type="invalid_request_error",
                                   code="invalid_api_key"))
        header = sent[0] if sent else ""
        scheme, _, given = header.partition(" ")
        # aiohttp hands over bytes that are not UTF-8 as lone surrogates; "surrogatepass" encodes
        # any str (no such value can equal a key) so a hostile header is a wrong key, not a 500
        given_b = given.strip().encode("utf-8", "surrogatepass")
        owner = None
        if scheme.lower() == "bearer":
            for key, tag in keys:  # no early exit: timing does not tell which key nearly matched
                if hmac.compare_digest(given_b, key) and owner is None:
                    owner = tag
        if owner is None:
            msg = ("You didn't provide an API key." if not header
                   else "Incorrect API key provided.")
            return render(ApiError(401, msg, type="invalid_request_error", code="invalid_api_key"))
        request[OWNER] = owner
        return await handler(request)

    return middleware
