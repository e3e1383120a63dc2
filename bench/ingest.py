"""Ingest benchmark: upload and validate a large batch input file (default 200 MB, 50,000 lines).

Starts the gateway in its own process on loopback (engine-free executor holding every request, so only
upload and validation are measured), writes the input file to a temp dir, streams it up with aiohttp, then
creates a batch and times validation (create -> `in_progress`). Token counts use a real tiny model's
tokenizer (`tools.tinymodel.write_tiny_model`), as a served model would. Prints MB/s for upload and
validation and the peak RSS growth of the gateway process (the file must never be held whole).

    .venv/bin/python bench/ingest.py [--mb 200] [--lines 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from multiprocessing.connection import Connection
from typing import Any, Sequence

import aiohttp
import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.app import create_app  # noqa: E402
from runtime.config import parse_config  # noqa: E402
from runtime.executor_api import OutcomeSink, WorkItem  # noqa: E402
from tests.gateway.doubles import EchoExecutor  # noqa: E402

WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda omicron sigma tau upsilon phi chi "
         "psi omega river mountain cloud signal vector matrix kernel token").split()


class HoldingExecutor(EchoExecutor):
    """Takes every request and runs none (until cancelled): measures ingest only, without the
    double's one task per request, which would bill 50,000 task creations to validation."""

    def __init__(self) -> None:
        super().__init__()
        self._stop = asyncio.Event()

    def submit(self, batch_id: str, items: Sequence[WorkItem], sink: OutcomeSink,
               strategy: str | None = None, known: Any = None,
               deadline_at: float | None = None) -> None:
        self.submitted.setdefault(batch_id, []).extend(items)

    async def cancel(self, batch_id: str) -> None:
        self._stop.set()

    async def wait(self, batch_id: str) -> None:
        await self._stop.wait()


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    """A process's resident memory (`VmHWM`: its peak so far), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(key)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used: on a shared machine, the figure that does not
    depend on what else runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(cfg_raw: dict[str, Any], conn: Connection) -> None:
    """The gateway in its own process, as deployed: the bench's client does not share its core."""
    async def main() -> None:
        runner = aiohttp.web.AppRunner(create_app(parse_config(cfg_raw), HoldingExecutor()))
        await runner.setup()
        site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        conn.send(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop
        await runner.cleanup()

    asyncio.run(main())


def write_input(path: Path, total_mb: int, lines: int) -> int:
    """`lines` chat requests of about total_mb / lines bytes each, streamed to disk."""
    rng = random.Random(0)
    per_line = total_mb * 1024 * 1024 // lines
    with open(path, "wb") as f:
        for i in range(lines):
            text = " ".join(rng.choices(WORDS, k=per_line // 5))[:max(1, per_line - 200)]
            line = {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "tiny", "max_tokens": 16,
                             "messages": [{"role": "user", "content": text}]}}
            f.write(orjson.dumps(line) + b"\n")
    return path.stat().st_size


def model_dir(root: Path) -> Path:
    cached = REPO / ".samullm" / "test-models" / "tiny-a"
    if (cached / "tokenizer.json").exists():
        return cached
    from tools.tinymodel import write_tiny_model

    return write_tiny_model(root / "tiny")


async def run(total_mb: int, lines: int) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="samullm-ingest-"))
    server = None
    try:
        path = tmp / "input.jsonl"
        size = write_input(path, total_mb, lines)
        cfg_raw = {
            "server": {"state_dir": str(tmp / "state")},
            "limits": {"max_file_bytes": size + 1, "max_requests_per_batch": lines},
            "models": [{"name": "tiny", "path": str(model_dir(tmp)), "max_model_len": 16384}],
        }
        ours, theirs = multiprocessing.Pipe()
        server = multiprocessing.get_context("spawn").Process(target=serve, args=(cfg_raw, theirs))
        server.start()
        port = await asyncio.to_thread(ours.recv)
        pid: int = server.pid  # type: ignore[assignment]
        rss0, cpu0 = rss_mb(pid), cpu_s(pid)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            t0 = time.perf_counter()
            with open(path, "rb") as fh:
                form = aiohttp.FormData()
                form.add_field("purpose", "batch")
                form.add_field("file", fh, filename="input.jsonl")
                async with http.post("/v1/files", data=form) as r:
                    assert r.status == 200, await r.text()
                    fid = (await r.json())["id"]
            t_up = time.perf_counter() - t0
            cpu1 = cpu_s(pid)
            t1 = time.perf_counter()
            async with http.post("/v1/batches", json={
                    "input_file_id": fid, "endpoint": "/v1/chat/completions",
                    "completion_window": "24h"}) as r:
                assert r.status == 200, await r.text()
                bid = (await r.json())["id"]
            while True:
                async with http.get(f"/v1/batches/{bid}") as r:
                    b = await r.json()
                if b["status"] != "validating":
                    break
                await asyncio.sleep(0.01)
            t_val = time.perf_counter() - t1
            cpu2 = cpu_s(pid)
            assert b["status"] == "in_progress", b.get("errors")
            assert b["request_counts"]["total"] == lines
        peak = rss_mb(pid, "VmHWM")
        ours.send("stop")
        await asyncio.to_thread(server.join, 30)
    finally:
        if server is not None and server.is_alive():
            server.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    mb = size / 1e6
    return {"mb": mb, "lines": lines, "upload_s": t_up, "upload_mb_s": mb / t_up,
            "validate_s": t_val, "validate_mb_s": mb / t_val,
            "ingest_mb_s": mb / (t_up + t_val), "rss_growth_mb": peak - rss0,
            "peak_rss_mb": peak, "upload_cpu_s": cpu1 - cpu0, "validate_cpu_s": cpu2 - cpu1}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=200)
    p.add_argument("--lines", type=int, default=50_000)
    args = p.parse_args()
    r = asyncio.run(run(args.mb, args.lines))
    print(f"file: {r['mb']:.1f} MB, {r['lines']} lines")
    print(f"upload:     {r['upload_s']:.2f} s  {r['upload_mb_s']:.0f} MB/s  (gateway CPU "
          f"{r['upload_cpu_s']:.2f} s: {r['mb'] / max(r['upload_cpu_s'], 1e-9):.0f} MB per CPU-s)")
    print(f"validation: {r['validate_s']:.2f} s  {r['validate_mb_s']:.0f} MB/s  (gateway CPU "
          f"{r['validate_cpu_s']:.2f} s: {r['mb'] / max(r['validate_cpu_s'], 1e-9):.0f} MB per CPU-s)")
    print(f"ingest (upload + validation): {r['ingest_mb_s']:.0f} MB/s")
    print(f"gateway process: peak RSS {r['peak_rss_mb']:.0f} MB (growth during ingest "
          f"{r['rss_growth_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
