"""`python -m tests.hardening.serve_double CONFIG`: the real gateway (`create_app`, `web.run_app`,
signal handling) in its own process, with an engine-free executor that finishes `RATE` requests per
second. Kill trials SIGKILL it at chosen points of a batch's life; engines would only add start time."""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

from gateway.app import create_app
from runtime.config import load_config
from tests.gateway.doubles import EchoExecutor

CONCURRENCY, SLOW_DELAY_S = 4, 0.02  # requests whose prompt says SLOW: ~200 per second


class PacedExecutor(EchoExecutor):
    """EchoExecutor whose requests run CONCURRENCY at a time; a prompt containing "SLOW" takes
    SLOW_DELAY_S (a batch to catch in progress), others finish at once."""

    def __init__(self) -> None:
        super().__init__()
        self._slots: asyncio.Semaphore | None = None

    async def _run(self, it, sink) -> None:  # type: ignore[override]
        if self._slots is None:
            self._slots = asyncio.Semaphore(CONCURRENCY)
        async with self._slots:
            if "SLOW" in str(it.body.get("messages")):
                await asyncio.sleep(SLOW_DELAY_S)
            await super()._run(it, sink)


def main(path: str) -> None:
    cfg = load_config(path)
    print(f"state dir: {cfg.state_dir}", flush=True)
    web.run_app(create_app(cfg, PacedExecutor(), expiry_interval_s=0.5), host=cfg.server.host,
                port=cfg.server.port, print=lambda *_: print("listening", flush=True))


if __name__ == "__main__":
    main(sys.argv[1])
