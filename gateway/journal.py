"""Per-batch append-only journal of finished requests (`Outcome`s), the source of truth for progress.

One JSON line per outcome in `<state_dir>/journals/<batch_id>.jsonl`. `append()` returns only after
the line is on disk (fsync). Appends that arrive while a flush is pending or running share the next
fsync (group commit), so a batch finishing thousands of requests per second costs a few fsyncs per
second, not thousands. A crash can tear only the last line: `load()` skips it and `Journal()`
truncates it before appending. A failed append (ENOSPC mid-record, a failed fsync) cuts the file back
to its last committed length before it raises, so a later append never glues a record to a fragment:
the file stays a sequence of whole lines, and a record that raised was never acknowledged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import logging

import orjson

from runtime.executor_api import Outcome

log = logging.getLogger(__name__)
GROUP_WINDOW_S = 0.002  # how long the first append of a group waits for company before fsync


def journal_path(state_dir: Path, batch_id: str) -> Path:
    return state_dir / "journals" / f"{batch_id}.jsonl"


_FIELDS = tuple(f.name for f in dataclasses.fields(Outcome))


def _encode(o: Outcome) -> bytes:
    # not dataclasses.asdict: it deep-copies the response body only to serialize it
    return orjson.dumps({k: getattr(o, k) for k in _FIELDS}) + b"\n"


def load(path: Path) -> list[Outcome]:
    """Outcomes in journal order, first record per custom_id; a torn (unterminated) last line is
    ignored; a missing file is an empty journal."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out: list[Outcome] = []
    seen: set[str] = set()
    bad: list[int] = []
    for lineno, raw in enumerate(data.split(b"\n")[:-1], start=1):  # after the last \n: torn/empty
        if not raw.strip():
            continue
        try:
            rec = orjson.loads(raw)
            o = Outcome(**rec)
        except (orjson.JSONDecodeError, TypeError):
            bad.append(lineno)  # appends cannot leave one (see the docstring): damage from outside
            continue
        if o.custom_id not in seen:
            seen.add(o.custom_id)
            out.append(o)
    if bad:
        log.warning("journal %s: %d unreadable line(s) skipped (line %s); their requests will be "
                    "re-run", path, len(bad), ", ".join(map(str, bad[:10])))
    return out


class Journal:
    """Appender for one batch. Use from one event loop."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        _truncate_torn_tail(path)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._committed = os.fstat(self._fd).st_size  # length of the whole, fsynced records
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self.fsyncs = 0  # for tests and metrics: how many groups were committed

    async def append(self, outcome: Outcome) -> None:
        if self._closed:
            raise RuntimeError(f"journal {self.path.name} is closed")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((_encode(outcome), fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop())
        await asyncio.shield(fut)

    async def _flush_loop(self) -> None:
        await asyncio.sleep(GROUP_WINDOW_S)
        while self._pending:
            group, self._pending = self._pending, []
            data = b"".join(line for line, _ in group)
            try:
                await asyncio.to_thread(self._write_sync, data)
            except OSError as exc:
                for _, fut in group:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.fsyncs += 1
            for _, fut in group:
                if not fut.done():
                    fut.set_result(None)

    def _write_sync(self, data: bytes) -> None:
        try:
            if os.fstat(self._fd).st_size != self._committed:
                os.ftruncate(self._fd, self._committed)  # an earlier cut that failed, retried
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            os.fsync(self._fd)
        except OSError:
            # Cut what this group wrote: a fragment left here would glue the next record to it and
            # load() would drop both. Truncating frees blocks, so it works on a full disk; if it
            # fails anyway, the next append retries it before writing.
            try:
                os.ftruncate(self._fd, self._committed)
            except OSError:
                pass
            raise
        self._committed += len(data)

    async def close(self) -> None:
        """Wait for pending appends to be durable, then close."""
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        os.close(self._fd)


def _truncate_torn_tail(path: Path) -> None:
    """Cut an unterminated last line (a crash mid-append), scanning back from the end only."""
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return
    with f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - 65536)
            f.seek(start)
            chunk = f.read(pos - start)
            if pos == end and chunk.endswith(b"\n"):
                return
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                pos = start + nl + 1
                break
            pos = start
        f.truncate(pos)
        f.flush()
        os.fsync(f.fileno())
