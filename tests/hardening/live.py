"""A live gateway in a background thread (its own event loop), for synchronous clients such as
schemathesis (requests) that would block the test's own loop. The executor is the gateway tests'
`EchoExecutor`: requests complete at once, no engines."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any, Iterator

from aiohttp import web

from gateway.app import create_app
from runtime.config import Config
from tests.gateway.doubles import EchoExecutor


@contextlib.contextmanager
def thread_server(cfg: Config, executor: Any = None) -> Iterator[str]:
    """Serve `create_app(cfg, executor)` on 127.0.0.1:<free port>; yields the base URL."""
    loop = asyncio.new_event_loop()
    ready: dict[str, Any] = {}
    started = threading.Event()

    async def up() -> web.AppRunner:
        runner = web.AppRunner(create_app(cfg, executor or EchoExecutor()))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ready["port"] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return runner

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            ready["runner"] = loop.run_until_complete(up())
        except BaseException as exc:  # surface start errors in the test thread
            ready["error"] = exc
        started.set()
        if "runner" in ready:
            loop.run_forever()
            loop.run_until_complete(ready["runner"].cleanup())
        loop.close()

    t = threading.Thread(target=main, name="live-gateway", daemon=True)
    t.start()
    started.wait(30)
    if "error" in ready:
        raise ready["error"]
    try:
        yield f"http://127.0.0.1:{ready['port']}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(30)
