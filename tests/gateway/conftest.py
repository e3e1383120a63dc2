"""Gateway test helpers: a config without engines, a running app on a free loopback port, the
official OpenAI SDK pointed at it, and request-file builders."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
from aiohttp import web
from openai import AsyncOpenAI

from gateway.app import create_app
from runtime.config import Config, parse_config
from runtime.executor_api import Executor

from .doubles import EchoExecutor

ARCH = {"num_layers": 2, "hidden_size": 128, "num_heads": 2, "num_kv_heads": 1,
        "intermediate_size": 512, "vocab_size": 2048}


def plan_only_config(state_dir: Path, *, api_keys: list[str] | None = None,
                     **limits: Any) -> Config:
    """Two chat models and an embedding model without weights (token counts fall back to chars/4)."""
    return parse_config({
        "server": {"state_dir": str(state_dir)},
        "auth": {"api_keys": api_keys or []},
        "limits": {"completion_windows": ["24h", "1h"], **limits},
        "models": [
            {"name": "tiny-a", "arch": ARCH, "max_model_len": 1024},
            {"name": "tiny-b", "arch": ARCH, "max_model_len": 1024},
            {"name": "embedder", "arch": ARCH, "max_model_len": 512,
             "engine_args": {"runner": "pooling", "convert": "embed"}},
        ],
    })


class Clock:
    """A settable clock for expiry tests."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Server:
    url: str
    app: web.Application
    executor: Any

    def client(self, api_key: str = "sk-unused-key", **kw: Any) -> AsyncOpenAI:
        kw.setdefault("max_retries", 0)
        return AsyncOpenAI(base_url=f"{self.url}/v1", api_key=api_key, **kw)


@contextlib.asynccontextmanager
async def running(cfg: Config, executor: Executor | None = None, **kw: Any
                  ) -> AsyncIterator[Server]:
    """The real aiohttp app on 127.0.0.1:<free port>; shut down (executor closed) on exit."""
    executor = executor if executor is not None else EchoExecutor()
    app = create_app(cfg, executor, **kw)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield Server(f"http://127.0.0.1:{port}", app, executor)
    finally:
        await runner.cleanup()


def chat_line(cid: str, model: str = "tiny-a", text: str = "hello", **body: Any) -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": text}],
                     "max_tokens": 8, **body}}


def jsonl(lines: list[Any]) -> bytes:
    """JSONL bytes; dict lines are dumped, str/bytes lines kept verbatim (for broken lines)."""
    out = [ln if isinstance(ln, bytes) else ln.encode() if isinstance(ln, str)
           else json.dumps(ln).encode() for ln in lines]
    return b"\n".join(out) + b"\n"


async def poll(client: AsyncOpenAI, batch_id: str, until: Callable[[Any], bool] | None = None,
               timeout_s: float = 30.0) -> Any:
    """Retrieve the batch until `until(batch)` (default: a final status)."""
    until = until or (lambda b: b.status in ("completed", "failed", "expired", "cancelled"))
    deadline = time.monotonic() + timeout_s
    while True:
        b = await client.batches.retrieve(batch_id)
        if until(b):
            return b
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} stuck in {b.status}: {b}")
        await asyncio.sleep(0.02)


async def held_batch(srv: Server, lines: list[Any], finished: int = 0) -> tuple[Any, Any]:
    """Upload `lines`, create a batch on an `EchoExecutor` held so that only `finished` requests
    finish; returns (file, batch) once those are counted."""
    srv.executor.hold()
    client = srv.client()
    f = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    b = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                    completion_window="24h")
    await poll(client, b.id, lambda x: x.status == "in_progress")
    if finished:
        srv.executor.release(finished)
        await poll(client, b.id, lambda x: x.request_counts.completed == finished)
    return f, b


async def read_lines(client: AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await client.files.content(file_id)
    return [json.loads(x) for x in content.text.splitlines() if x.strip()]


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return plan_only_config(tmp_path / "state")
