"""Headless chromium for the status page tests: `dump_dom` and `screenshot` (one run of the command
line each), and `DevTools` (the DevTools protocol over aiohttp's websocket client: navigate, type,
evaluate, and every request the page sent). Tests skip when no chromium is installed (`make install`
installs Debian's)."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))
                 if p), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (make install adds it)")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-extensions", "--disable-background-networking", "--hide-scrollbars",
         "--disable-dev-shm-usage", "--password-store=basic")


async def _run(*args: str, timeout_s: float = 60.0) -> str:
    """Chromium with `args` (the event loop keeps serving the gateway meanwhile); its stdout."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory() as profile:
        proc = await asyncio.create_subprocess_exec(
            CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


async def dump_dom(url: str, budget_ms: int = 4000) -> str:
    """The DOM after the page's scripts ran for `budget_ms` of virtual time."""
    return await _run(f"--virtual-time-budget={budget_ms}", "--dump-dom", url)


async def screenshot(url: str, path: Path, size: str = "1280,900", budget_ms: int = 4000) -> None:
    await _run(f"--virtual-time-budget={budget_ms}", f"--window-size={size}",
               f"--screenshot={path}", url)


class DevTools:
    """One headless chromium and its first tab, driven over the DevTools protocol. `requests`:
    every request the tab sent (`Network.requestWillBeSent`'s `request`: url, method, headers)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}

    async def __aenter__(self) -> "DevTools":
        assert CHROMIUM is not None
        self._profile = tempfile.TemporaryDirectory()
        self._proc = await asyncio.create_subprocess_exec(
            CHROMIUM, *FLAGS, f"--user-data-dir={self._profile.name}", "--remote-debugging-port=0",
            "about:blank", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        port = await asyncio.wait_for(self._port(), 30)
        assert self._proc.stderr is not None
        self._drain = asyncio.create_task(self._proc.stderr.read())  # a full pipe would block it
        self._http = aiohttp.ClientSession()
        async with self._http.get(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(t for t in await r.json() if t["type"] == "page")
        self._ws = await self._http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        await self.send("Network.enable")
        await self.send("Page.enable")
        return self

    async def _port(self) -> int:
        assert self._proc.stderr is not None
        while line := await self._proc.stderr.readline():
            m = re.search(rb"DevTools listening on ws://[^:]+:(\d+)/", line)
            if m:
                return int(m.group(1))
        raise AssertionError("chromium exited before it listened")

    async def _read(self) -> None:
        async for msg in self._ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self._waiting:
                self._waiting.pop(data["id"]).set_result(data)
            elif data.get("method") == "Network.requestWillBeSent":
                self.requests.append(data["params"]["request"])

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        mid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[mid] = fut
        await self._ws.send_json({"id": mid, "method": method, "params": params})
        got = await asyncio.wait_for(fut, 30)
        assert "error" not in got, got
        return got.get("result", {})

    async def js(self, expression: str) -> Any:
        got = await self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                              awaitPromise=True)
        assert "exceptionDetails" not in got, got
        return got["result"].get("value")

    async def until(self, expression: str, timeout_s: float = 20.0) -> Any:
        """Evaluate `expression` until it is truthy (an exception counts as false: the page may not
        be there yet); its value."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        guarded = (f"(() => {{ try {{ return ({expression}) || null; }} "
                   "catch (e) { return null; } })()")
        while (value := await self.js(guarded)) is None:
            if asyncio.get_running_loop().time() > deadline:
                html = await self.js("document.documentElement.outerHTML")
                raise AssertionError(f"never true: {expression}\n{html[:3000]}")
            await asyncio.sleep(0.1)
        return value

    async def __aexit__(self, *exc: Any) -> None:
        self._reader.cancel()
        await self._ws.close()
        await self._http.close()
        self._proc.terminate()
        try:
            await asyncio.wait_for(self._proc.wait(), 10)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()
        await self._drain
        self._profile.cleanup()
