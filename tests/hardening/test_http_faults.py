"""Faults at the HTTP edge: a full disk under an upload's abort and under a delete, bytes a failed
upload leaves behind, hostile Authorization headers, control characters and keys in log records.
Real SQLite, real files, the real app on a loopback port; raw sockets where a client library would
refuse to send the bytes. A full disk is a small tmpfs where one can be mounted, an injected ENOSPC
otherwise (and always, where a tmpfs cannot time the fault)."""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import openai
from aiohttp import http_parser, web_protocol
import pytest
from multidict import CIMultiDict
from yarl import URL

from gateway import filestore
from gateway.db import Database
from gateway.filestore import AtomicWriter
from gateway.logs import TEXT_FORMAT, JsonFormatter, RequestIdFilter
from gateway.state import DB, STORE

from ..gateway.conftest import chat_line, jsonl, plan_only_config, running
from .corpus import MP, multipart

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(60)]
KEY = "sk-http-faults-secret-0001"
GOOD = jsonl([chat_line("a")])
FULL = "database or disk is full"


@pytest.fixture
def cfg(tmp_path):
    return plan_only_config(tmp_path / "state")


def stored(state_dir: Path) -> list[str]:
    return sorted(p.name for p in (state_dir / "files").iterdir())


async def raw_request(url: str, data: bytes) -> bytes:
    """Send `data` as is on a fresh connection; everything the server answers until it closes."""
    u = URL(url)
    reader, writer = await asyncio.open_connection(u.host, u.port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


# --- 1. abort on a full disk ---------------------------------------------------------------------
class FillsAfter(io.RawIOBase):
    """A file on a disk with `room` bytes left: writes past that raise ENOSPC."""

    def __init__(self, f: Any, room: int) -> None:
        self.f, self.room = f, room

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(b)
        return self.f.write(b)

    def fileno(self) -> int:
        return self.f.fileno()

    def close(self) -> None:
        self.f.close()
        super().close()


async def test_abort_on_a_full_disk_removes_the_temp_file(tmp_path, monkeypatch):
    """The disk fills 3 MB into an upload: the buffered tail cannot be flushed, so closing the temp
    file raises ENOSPC too; abort still removes the temp file, closes it and raises nothing."""
    opened: list[FillsAfter] = []

    def open_full(path: Any, mode: str) -> io.BufferedWriter:
        opened.append(FillsAfter(open(path, mode, buffering=0), room=3_000_000))
        return io.BufferedWriter(opened[-1])

    monkeypatch.setattr(filestore, "open", open_full, raising=False)
    w = AtomicWriter(tmp_path / "f")
    with pytest.raises(OSError) as exc:
        for _ in range(2000):
            w.write(b"x" * 3000)
    assert exc.value.errno == errno.ENOSPC
    w.abort()
    assert list(tmp_path.iterdir()) == [] and opened[0].closed


async def test_abort_on_a_real_full_disk(small_disk):
    w = AtomicWriter(small_disk / "f")
    with pytest.raises(OSError) as exc:
        while True:
            w.write(b"x" * 3000)  # an upload's chunks: smaller than the writer's buffer
    assert exc.value.errno == errno.ENOSPC
    w.abort()
    assert list(small_disk.iterdir()) == []


# --- 2. delete on a full disk --------------------------------------------------------------------
class FullDatabase:
    """The gateway's SQLite connection on a disk with no room for a DELETE's WAL frames while the
    store's reserve takes the last free space (and, with `stays_full`, after it is released)."""

    def __init__(self, db: Database, reserve: Path, content: Path,
                 stays_full: bool = False) -> None:
        self._conn, self.reserve, self.content = db._db, reserve, content
        self.stays_full = stays_full
        self.attempts: list[tuple[bool, bool]] = []  # (reserve there, content there) per DELETE

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.startswith("DELETE FROM files"):
            self.attempts.append((self.reserve.exists(), self.content.exists()))
            if self.reserve.exists() or self.stays_full:
                raise sqlite3.OperationalError(FULL)
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def test_delete_works_on_a_full_disk(cfg, monkeypatch):
    async with running(cfg) as srv:
        client = srv.client()
        f = await client.files.create(file=("a.jsonl", GOOD), purpose="batch")
        store, db = srv.app[STORE], srv.app[DB]
        assert store.reserve.stat().st_size == filestore.RESERVE_BYTES
        assert stored(cfg.state_dir) == [f.id]  # the reserve is not in the files dir
        full = FullDatabase(db, store.reserve, store.path(f.id))
        monkeypatch.setattr(db, "_db", full)
        assert (await client.files.delete(f.id)).deleted
        # the content went first, then the reserve, and the retried DELETE fit in that room
        assert full.attempts == [(True, True), (False, False)]
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(f.id)
        assert stored(cfg.state_dir) == [] and not store.reserve.exists()
        monkeypatch.setattr(db, "_db", full._conn)
        g = await client.files.create(file=("b.jsonl", GOOD), purpose="batch")
        assert store.reserve.stat().st_size == filestore.RESERVE_BYTES  # back before the upload
        assert stored(cfg.state_dir) == [g.id]


async def test_a_delete_still_out_of_room_frees_the_content_and_can_be_retried(cfg, monkeypatch):
    async with running(cfg) as srv:
        client = srv.client()
        f = await client.files.create(file=("a.jsonl", GOOD), purpose="batch")
        store, db = srv.app[STORE], srv.app[DB]
        full = FullDatabase(db, store.reserve, store.path(f.id), stays_full=True)
        monkeypatch.setattr(db, "_db", full)
        with pytest.raises(openai.APIStatusError) as exc:
            await client.files.delete(f.id)
        assert exc.value.status_code == 507 and exc.value.code == "insufficient_storage"
        assert stored(cfg.state_dir) == []  # the bytes are freed although the row stays
        full.stays_full = False
        assert (await client.files.delete(f.id)).deleted
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(f.id)


async def test_delete_works_on_a_real_full_disk(small_disk):
    cfg = plan_only_config(small_disk / "state")
    async with running(cfg) as srv:
        client = srv.client()
        ids = [(await client.files.create(file=(f"{i}.jsonl", GOOD * 400), purpose="batch")).id
               for i in range(3)]
        fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)  # takes every free byte
        with pytest.raises(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        for fid in ids:
            assert (await client.files.delete(fid)).deleted
        assert stored(cfg.state_dir) == []
        assert not srv.app[STORE].reserve.exists()  # SQLite did run out of room: it was needed
        (small_disk / "filler").unlink()
        await client.files.create(file=("a.jsonl", GOOD), purpose="batch")
        assert srv.app[STORE].reserve.exists()


async def test_an_upload_without_room_for_the_reserve_is_507(cfg, monkeypatch):
    async with running(cfg) as srv:
        client = srv.client()
        srv.app[STORE].release_reserve()

        def no_room(fd: int, offset: int, length: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(filestore.os, "posix_fallocate", no_room)
        with pytest.raises(openai.APIStatusError) as exc:
            await client.files.create(file=("a.jsonl", GOOD), purpose="batch")
        assert exc.value.status_code == 507
        assert stored(cfg.state_dir) == [] and not list(cfg.state_dir.glob(".reserve*"))


# --- 3. nothing without a row survives a request, or a restart -----------------------------------
async def _post(srv, body: bytes) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{srv.url}/v1/files", data=body,
                             headers={"Content-Type": MP}) as r:
            return r.status, await r.json()


async def test_a_truncated_upload_leaves_no_bytes(cfg):
    body = multipart([("purpose", None, b"batch"), ("file", "a.jsonl", GOOD * 100)], close=False)
    async with running(cfg) as srv:
        status, err = await _post(srv, body[:-40])
        assert status == 400 and err["error"]["message"]
    assert stored(cfg.state_dir) == []


async def test_a_filename_that_is_not_utf8_is_400(cfg):
    body = multipart([("purpose", None, b"batch"), ("file", "NAME.jsonl", GOOD)])
    async with running(cfg) as srv:
        status, err = await _post(srv, body.replace(b"NAME", b"caf\xe9"))  # latin-1
        assert status == 400, err
        assert (err["error"]["code"], err["error"]["param"]) == ("invalid_filename", "file")
        assert [f async for f in srv.client().files.list()] == []
    assert stored(cfg.state_dir) == []


async def test_a_failed_row_insert_leaves_no_bytes(cfg, monkeypatch):
    def full(self, row):
        raise sqlite3.OperationalError(FULL)

    monkeypatch.setattr(Database, "insert_file", full)
    async with running(cfg) as srv:
        with pytest.raises(openai.APIStatusError) as exc:
            await srv.client().files.create(file=("a.jsonl", GOOD), purpose="batch")
        assert exc.value.status_code == 507
    assert stored(cfg.state_dir) == []


async def test_a_second_file_part_is_400_and_neither_is_kept(cfg):
    body = multipart([("purpose", None, b"batch"), ("file", "a.jsonl", GOOD),
                      ("file", "b.jsonl", GOOD)])
    async with running(cfg) as srv:
        status, err = await _post(srv, body)
        assert status == 400 and err["error"]["param"] == "file", err
        assert [f async for f in srv.client().files.list()] == []
    assert stored(cfg.state_dir) == []


async def test_startup_sweep_removes_files_without_a_row(cfg, caplog):
    async with running(cfg) as srv:
        kept = (await srv.client().files.create(file=("a.jsonl", GOOD), purpose="batch")).id
    files, journals = cfg.state_dir / "files", cfg.state_dir / "journals"
    (files / "file-orphan0000000000000000").write_bytes(b"x" * 1000)  # bytes, then a crash
    (files / f"{kept}.tmp").write_bytes(b"half")
    journals.mkdir(exist_ok=True)
    (journals / "batch_000000000000000000000000.jsonl").write_bytes(b"{}\n")
    caplog.set_level(logging.INFO)
    async with running(cfg) as srv:
        assert (await srv.client().files.content(kept)).content == GOOD
    assert stored(cfg.state_dir) == [kept]
    assert [p.name for p in journals.iterdir()] == ["batch_000000000000000000000000.jsonl"]
    assert "file-orphan0000000000000000" in caplog.text


# --- 4. Authorization headers aiohttp accepts but a key check must not trust --------------------
async def test_an_authorization_header_that_is_not_utf8_is_401(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with running(plan_only_config(tmp_path / "s", api_keys=[KEY])) as srv:
        raw = await raw_request(srv.url, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: "
                                b"close\r\nAuthorization: Bearer sk-\xff\xfe\xe9\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), raw
    assert b'"invalid_api_key"' in body
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("order", ["valid_first", "valid_last"])
async def test_two_authorization_headers_are_refused(tmp_path, order):
    values = [f"Bearer {KEY}", "Bearer sk-someone-else-0000"]
    if order == "valid_last":
        values.reverse()
    headers = CIMultiDict(("Authorization", v) for v in values)
    async with running(plan_only_config(tmp_path / "s", api_keys=[KEY])) as srv, \
            aiohttp.ClientSession(srv.url) as http:
        async with http.get("/v1/models", headers=headers) as r:
            body = await r.json()
            assert r.status == 401 and body["error"]["code"] == "invalid_api_key", body
        async with http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status == 200


# --- 5, 6. what reaches the logs -----------------------------------------------------------------
async def test_control_characters_in_a_path_are_escaped_in_the_access_log(cfg):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    access = logging.getLogger("samullm.access")
    access.addHandler(handler)
    old_level = access.level
    access.setLevel(logging.INFO)
    forged = ("/v1/files/%0A2030-01-01%2000:00:00,000%20INFO%20samullm.access%20[x]:%20GET"
              "%20/v1/admin%20200%1b[2J")
    try:
        async with running(cfg) as srv, aiohttp.ClientSession() as http:
            async with http.get(URL(srv.url + forged, encoded=True)) as r:
                assert r.status == 404
    finally:
        access.removeHandler(handler)
        access.setLevel(old_level)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines  # one request, one line: the newline is written as \n
    assert "/v1/files/\\n2030-01-01" in lines[0] and "\\x1b[2J" in lines[0]
    assert "\x1b" not in lines[0]


K = KEY.encode()
MALFORMED = [b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + h + b"\r\n\r\n" for h in (
    # each makes aiohttp's parser fail and log the bytes it failed on (which, how much, depends
    # on the parser and its version: a header line, a value, a line's first 100 bytes)
    b"Authorization: Bearer " + K + b"\x01",
    b"Authorization: Bearer " + K + b"\r\nX-Bad\x7f: 1",
    b"Authorization: Bearer sk-not-configured-0042\r\nX-Bad\x00: 1",
    b"Api-Key: " + K + b"\x01",  # a configured key in a header we do not read
    b"Api-Key: " + K + b"\r\nBad Header",
    b"authorization:" + K + b"\x7f",
    b"Authorization: Basic c2stbm90LWNvbmZpZ3VyZWQtMDA0Mg==\x01",
    b"Authorization: Bearer " + K + b"A" * 9000,  # too long
)]


@pytest.mark.parametrize("parser", ["c", "python"])
async def test_a_request_aiohttp_cannot_parse_logs_no_key(tmp_path, caplog, monkeypatch, parser):
    if parser == "python":
        monkeypatch.setattr(web_protocol, "HttpRequestParser", http_parser.HttpRequestParserPy)
    caplog.set_level(logging.DEBUG)
    async with running(plan_only_config(tmp_path / "s", api_keys=[KEY])) as srv:
        for data in MALFORMED:
            raw = await raw_request(srv.url, data)
            assert raw.split(b" ", 2)[1] == b"400", (data, raw)
    logged = [r for r in caplog.records if r.name.startswith("aiohttp")]
    assert len(logged) >= len(MALFORMED)  # the parse errors were logged, with their tracebacks
    assert any("Error handling request" in r.getMessage() for r in logged)
    plain, js = logging.Formatter(), JsonFormatter()
    text = caplog.text + "\n".join(plain.format(r) + js.format(r) + repr(r.__dict__)
                                   for r in caplog.records)
    assert "BadHttpMessage" in text or "InvalidHeader" in text
    for secret in (KEY, "http-faults-secret", "sk-not-configured-0042", "c2stbm90LWNvbmZpZ3VyZWQt"):
        assert secret not in text

