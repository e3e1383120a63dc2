"""The hostile / broken input corpus (`corpus.py`) against one live gateway (engine-free executor).

Every case asserts the HTTP status and the OpenAI-shaped error (type, code, param) or, for batch
files, the failed batch's errors.data code and 1-based line. After every case the server still
answers, and at the end every accepted request has exactly one line across output and error files.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import openai
import pytest
import pytest_asyncio

from ..gateway.conftest import plan_only_config, poll, read_lines, running
from .corpus import (CHAT, CREATES, LINES, MAX_FILE_BYTES, MAX_LINE_BYTES, UPLOADS, chat, jsonl,
                     multipart)

pytestmark = pytest.mark.asyncio(loop_scope="session")
ACCEPTED: list[tuple[str, list[str]]] = []  # (batch id, custom ids) of accepted batches


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def srv(tmp_path_factory):
    cfg = plan_only_config(tmp_path_factory.mktemp("corpus"), max_file_bytes=MAX_FILE_BYTES,
                           max_line_bytes=MAX_LINE_BYTES)
    async with running(cfg) as server:
        async with aiohttp.ClientSession(server.url) as http:
            server.http = http  # type: ignore[attr-defined]
            server.state_dir = cfg.state_dir  # type: ignore[attr-defined]
            yield server


async def _still_serving(srv) -> None:
    async with srv.http.get("/health") as r:
        assert r.status == 200
    async with srv.http.get("/v1/files", params={"limit": "1"}) as r:
        assert r.status == 200


def _assert_error(body: dict, code: str | None, param: str | None) -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err


@pytest.mark.parametrize("name,ctype,body,status,code,param", UPLOADS, ids=[u[0] for u in UPLOADS])
async def test_upload(srv, name, ctype, body, status, code, param):
    async with srv.http.post("/v1/files", data=body, headers={"Content-Type": ctype}) as r:
        assert r.status == status, await r.text()
        _assert_error(await r.json(), code, param)
    await _still_serving(srv)


async def test_rejected_uploads_leave_nothing(srv):
    async with srv.http.get("/v1/files") as r:
        assert (await r.json())["data"] == []  # nothing from the upload cases above was stored


@pytest.mark.parametrize("filename", ["../../etc/passwd", "a\x00b.jsonl", "..\\..\\x.jsonl",
                                      "\u00e9t\u00e9 \U0001f600.jsonl", "/abs/path.jsonl",
                                      "x" * 4000])
async def test_hostile_filenames_stored_under_id(srv, filename):
    body = multipart([("purpose", None, b"batch"), ("file", filename, jsonl([chat("a")]))])
    async with srv.http.post("/v1/files", data=body,
                             headers={"Content-Type": f"multipart/form-data; boundary="
                                                      f"{'hardening-boundary-7f3a'}"}) as r:
        if "\x00" in filename:
            # a NUL cannot appear in an HTTP header: the part is malformed, nothing is stored
            assert r.status == 400, await r.text()
            _assert_error(await r.json(), None, None)
            return
        assert r.status == 200, await r.text()
        f = await r.json()
    assert f["filename"] == filename.lstrip("/")  # aiohttp drops a leading slash; kept as text
    files_dir = Path(srv.state_dir) / "files"
    assert (files_dir / f["id"]).is_file()
    assert all(p.parent == files_dir for p in files_dir.iterdir())
    assert all(p.name.startswith("file-") for p in files_dir.iterdir())
    async with srv.http.delete(f"/v1/files/{f['id']}") as r:
        assert r.status == 200


async def _upload(srv, data: bytes, purpose: str = "batch") -> str:
    client = srv.client()
    return (await client.files.create(file=("in.jsonl", data), purpose=purpose)).id


@pytest.mark.parametrize("name,body,status,code,param", CREATES, ids=[c[0] for c in CREATES])
async def test_create(srv, name, body, status, code, param):
    fid = await _upload(srv, jsonl([chat("a")]))
    body = body.replace(b"{file}", fid.encode())
    async with srv.http.post("/v1/batches", data=body,
                             headers={"Content-Type": "application/json"}) as r:
        assert r.status == status, await r.text()
        _assert_error(await r.json(), code, param)
    await _still_serving(srv)


async def test_create_on_batch_output_file_and_deleted_file(srv):
    client = srv.client()
    fid = await _upload(srv, jsonl([chat("a")]))
    b = await client.batches.create(input_file_id=fid, endpoint=CHAT, completion_window="24h")
    done = await poll(client, b.id)
    ACCEPTED.append((b.id, ["a"]))
    with pytest.raises(openai.BadRequestError) as exc:
        await client.batches.create(input_file_id=done.output_file_id, endpoint=CHAT,
                                    completion_window="24h")
    assert exc.value.code == "invalid_file_purpose" and exc.value.param == "input_file_id"
    await client.files.delete(fid)
    with pytest.raises(openai.NotFoundError) as exc:
        await client.batches.create(input_file_id=fid, endpoint=CHAT, completion_window="24h")
    assert exc.value.code == "not_found"


async def test_unicode_metadata_round_trips(srv):
    client = srv.client()
    fid = await _upload(srv, jsonl([chat("a")]))
    meta = {"\u540d\u524d": "\u00e9t\u00e9 \U0001f600", "rtl": "\u202eabc", "k" * 64: "\u4f60" * 512}
    b = await client.batches.create(input_file_id=fid, endpoint=CHAT, completion_window="24h",
                                    metadata=meta)
    assert b.metadata == meta
    assert (await poll(client, b.id)).metadata == meta
    ACCEPTED.append((b.id, ["a"]))


@pytest.mark.parametrize("name,data,code,line,param", LINES, ids=[c[0] for c in LINES])
async def test_batch_file(srv, name, data, code, line, param):
    client = srv.client()
    fid = await _upload(srv, data)
    b = await client.batches.create(input_file_id=fid, endpoint=CHAT, completion_window="24h")
    done = await poll(client, b.id, timeout_s=120)
    if code is None:
        assert done.status == "completed", done.errors
        lines = [json.loads(x) for x in data.decode("utf-8-sig").splitlines() if x.strip()]
        ids = [ln["custom_id"] for ln in lines]
        ACCEPTED.append((b.id, ids))
        sent = srv.executor.submitted[b.id]
        assert [it.custom_id for it in sent] == ids
        for it, ln in zip(sent, lines):
            assert it.body == ln["body"]  # forwarded untouched: the engine judges its parameters
        return
    assert done.status == "failed", done
    err = done.errors.data[0]
    assert (err.code, err.line) == (code, line), err
    if param is not None:
        assert err.param == param
    assert err.message
    assert b.id not in srv.executor.submitted  # a failed batch never half-runs
    await _still_serving(srv)


async def test_cancel_twice_and_cancel_finished(srv):
    client = srv.client()
    srv.executor.hold()
    try:
        fid = await _upload(srv, jsonl([chat(f"r{i}") for i in range(4)]))
        b = await client.batches.create(input_file_id=fid, endpoint=CHAT, completion_window="24h")
        await poll(client, b.id, lambda x: x.status == "in_progress")
        srv.executor.release(1)
        await poll(client, b.id, lambda x: x.request_counts.completed == 1)
        first = await client.batches.cancel(b.id)
        second = await client.batches.cancel(b.id)
        assert first.status in ("cancelling", "cancelled")
        assert second.status in ("cancelling", "cancelled") and second.id == b.id
        done = await poll(client, b.id)
        assert done.status == "cancelled"
        again = await client.batches.cancel(b.id)  # cancelling a cancelled batch: no-op, 200
        assert again.status == "cancelled"
    finally:
        srv.executor._gate = None
    ACCEPTED.append((b.id, [f"r{i}" for i in range(4)]))
    completed = ACCEPTED[0][0]
    async with srv.http.post(f"/v1/batches/{completed}/cancel") as r:
        assert r.status == 409 and r.headers["x-should-retry"] == "false"
        _assert_error(await r.json(), None, None)


async def test_cancel_while_validating(srv):
    client = srv.client()
    ids = [f"v{i}" for i in range(15_000)]  # validation takes a moment: cancel lands during it
    fid = await _upload(srv, jsonl([chat(c, max_tokens=1) for c in ids]))
    b = await client.batches.create(input_file_id=fid, endpoint=CHAT, completion_window="24h")
    assert b.status == "validating"
    c = await client.batches.cancel(b.id)
    assert c.status == "cancelling"
    done = await poll(client, b.id, timeout_s=120)
    assert done.status == "cancelled", done
    assert b.id not in srv.executor.submitted  # nothing ran
    err = await read_lines(client, done.error_file_id)
    assert len(err) == len(ids) and {e["error"]["code"] for e in err} == {"batch_cancelled"}
    ACCEPTED.append((b.id, ids))


@pytest.mark.parametrize("trial", range(5))
async def test_concurrent_cancel_and_completion(srv, trial):
    client = srv.client()
    srv.executor.hold()
    ids = [f"c{trial}-{i}" for i in range(20)]
    try:
        fid = await _upload(srv, jsonl([chat(c) for c in ids]))
        b = await client.batches.create(input_file_id=fid, endpoint=CHAT, completion_window="24h")
        await poll(client, b.id, lambda x: x.status == "in_progress")
        srv.executor.release(19 + trial % 2)  # the last request finishes as the cancel lands
        await asyncio.sleep(0.001 * trial)
        cancel = asyncio.create_task(client.batches.cancel(b.id))
        try:
            await cancel
        except openai.ConflictError:  # the batch finished first
            pass
        done = await poll(client, b.id)
    finally:
        srv.executor._gate = None
    assert done.status in ("completed", "cancelled")
    rc = done.request_counts
    assert rc.total == 20 and rc.completed + rc.failed <= 20
    ACCEPTED.append((b.id, ids))


async def test_no_accepted_request_lost(srv):
    client = srv.client()
    assert len(ACCEPTED) >= 10
    for bid, ids in ACCEPTED:
        b = await client.batches.retrieve(bid)
        assert b.status in ("completed", "cancelled"), b
        out = await read_lines(client, b.output_file_id)
        err = await read_lines(client, b.error_file_id)
        got = [x["custom_id"] for x in out + err]
        assert sorted(got) == sorted(ids), bid  # each exactly once
        assert b.request_counts.completed == len(out)
    await _still_serving(srv)
