"""An engine start is noticed soon after its server answers `/health` (`Engine._wait_healthy`)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from runtime.config import ModelConfig
from runtime.engines.engine import Engine, EngineSpec, free_port


class Running:
    returncode = None  # a process still running


async def test_a_start_is_noticed_within_a_tenth_of_a_second_of_health(tmp_path: Path) -> None:
    """Starts were measured in steps of the health poll: 3.52, 4.02, 4.52 … 7.03 s in
    `bench.fresh` (5 Dec 2026), up to 0.5 s of every start lost."""
    engine = Engine(EngineSpec(model=ModelConfig(name="fake", path=str(tmp_path)),
                               model_path=tmp_path, devices=(0,)))
    engine.port = free_port()
    engine.base_url = f"http://127.0.0.1:{engine.port}"
    engine._proc = Running()  # type: ignore[assignment]
    app = web.Application()
    app.router.add_get("/health", lambda _: web.Response(text="ok"))
    runner = web.AppRunner(app)
    await runner.setup()
    lags = []
    try:
        async with aiohttp.ClientSession() as session:
            engine._session = session
            for delay in (0.33, 0.71):
                waiting = asyncio.create_task(engine._wait_healthy(time.monotonic() + 10))
                await asyncio.sleep(delay)  # the server comes up while the engine polls
                site = web.TCPSite(runner, "127.0.0.1", engine.port)
                await site.start()
                up = time.monotonic()
                await asyncio.wait_for(waiting, 5)
                lags.append(time.monotonic() - up)
                await site.stop()
    finally:
        await runner.cleanup()
    assert max(lags) < 0.15, lags
