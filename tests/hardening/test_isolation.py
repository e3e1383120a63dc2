"""Key isolation on every route, constant-time key checks, keys never logged, request ids."""

from __future__ import annotations

import io
import json
import logging

import aiohttp
import pytest

from gateway import auth
from gateway.logs import HEADER, JsonFormatter, RequestIdFilter

from ..gateway.conftest import chat_line, jsonl, plan_only_config, poll, running

pytestmark = pytest.mark.asyncio(loop_scope="session")
ALICE, BOB = "sk-alice-secret-0001", "sk-bob-secret-00002"
CHAT = "/v1/chat/completions"


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _call(http, method, path, key, **kw):
    async with http.request(method, path, headers=_h(key), **kw) as r:
        return r.status, await r.json(), dict(r.headers)


async def test_second_key_sees_nothing_of_the_first(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    cfg = plan_only_config(tmp_path / "state", api_keys=[ALICE, BOB])
    async with running(cfg) as srv, aiohttp.ClientSession(srv.url) as http:
        alice = srv.client(ALICE)
        f = await alice.files.create(file=("in.jsonl", jsonl([chat_line("a"), chat_line("b")])),
                                     purpose="batch")
        done = await poll(alice, (await alice.batches.create(
            input_file_id=f.id, endpoint=CHAT, completion_window="24h")).id)
        srv.executor.hold()
        running_b = await alice.batches.create(input_file_id=f.id, endpoint=CHAT,
                                               completion_window="24h")
        await poll(alice, running_b.id, lambda x: x.status == "in_progress")
        objects = {"input": f.id, "output": done.output_file_id}
        batch_body = {"input_file_id": f.id, "endpoint": CHAT, "completion_window": "24h"}
        # every route that takes an object id or lists objects, as Bob
        probes = [("GET", f"/v1/files/{fid}") for fid in objects.values()]
        probes += [("GET", f"/v1/files/{fid}/content") for fid in objects.values()]
        probes += [("DELETE", f"/v1/files/{fid}") for fid in objects.values()]
        probes += [("GET", f"/v1/batches/{done.id}"), ("GET", f"/v1/batches/{running_b.id}"),
                   ("POST", f"/v1/batches/{running_b.id}/cancel"),
                   ("POST", f"/v1/batches/{done.id}/cancel"),
                   ("GET", f"/v1/files?after={f.id}"), ("GET", f"/v1/batches?after={done.id}")]
        for method, path in probes:
            status, body, _ = await _call(http, method, path, BOB)
            assert status == 404, (method, path, body)
            # indistinguishable from an id that never existed (no existence oracle)
            fake = path.replace(f.id, "file-000000000000000000000000").replace(
                done.output_file_id, "file-000000000000000000000000").replace(
                done.id, "batch_000000000000000000000000").replace(
                running_b.id, "batch_000000000000000000000000")
            status2, body2, _ = await _call(http, method, fake, BOB)
            assert status2 == 404 and body2["error"]["code"] == body["error"]["code"] == "not_found"
        status, body, _ = await _call(http, "POST", "/v1/batches", BOB, json=batch_body)
        assert status == 404 and body["error"]["code"] == "not_found"
        for path in ("/v1/files", "/v1/batches"):
            status, body, _ = await _call(http, "GET", path, BOB)
            assert status == 200 and body["data"] == [] and body["has_more"] is False
        # and Alice still has everything, untouched by Bob's attempts
        assert (await alice.batches.retrieve(running_b.id)).status == "in_progress"
        assert (await alice.files.content(done.output_file_id)).content
        assert {b.id async for b in alice.batches.list()} == {done.id, running_b.id}
        srv.executor.release(2)
        # a wrong key and a missing header are 401 with OpenAI's shape
        for headers in ({}, {"Authorization": "Bearer sk-alice-secret-0002"},
                        {"Authorization": f"Basic {ALICE}"}):
            async with http.get("/v1/files", headers=headers) as r:
                assert r.status == 401
                assert (await r.json())["error"]["code"] == "invalid_api_key"
    # keys never reach a log record, in any form the formatters could print
    fmt = JsonFormatter()
    text = "\n".join(fmt.format(r) + repr(r.__dict__) for r in caplog.records)
    assert "samullm.access" in text  # the access lines were captured
    for secret in (ALICE, BOB, "sk-alice-secret-0002", "alice-secret", "bob-secret"):
        assert secret not in text


async def test_key_check_is_constant_time_over_all_keys(tmp_path, monkeypatch):
    keys = [f"sk-key-number-{i:04d}" for i in range(5)]
    compared: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def recording(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", recording)
    async with running(plan_only_config(tmp_path / "s", api_keys=keys)) as srv, \
            aiohttp.ClientSession(srv.url) as http:
        for given in (keys[0], keys[4], "sk-wrong-key-0000"):
            compared.clear()
            async with http.get("/v1/models", headers=_h(given)) as r:
                assert r.status == (401 if given.startswith("sk-wrong") else 200)
            # every configured key is compared, with compare_digest, whichever matches
            assert sorted(b for _, b in compared) == sorted(k.encode() for k in keys)


async def test_request_ids_and_json_log_lines(tmp_path):
    cfg = plan_only_config(tmp_path / "state")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("samullm.access")
    access.addHandler(handler)
    old_level = access.level
    access.setLevel(logging.INFO)
    try:
        async with running(cfg) as srv, aiohttp.ClientSession(srv.url) as http:
            async with http.get("/v1/models", headers={HEADER: "client-id-123"}) as r:
                assert r.headers[HEADER] == "client-id-123"  # a sane client id is kept
            async with http.get("/v1/nope", headers={HEADER: "bad id\twith\u00e9"}) as r:
                assert r.status == 404
                rid = r.headers[HEADER]
                assert rid.startswith("req_") and len(rid) == 28  # an unsafe one is replaced
            async with http.get("/health") as r:
                assert r.headers[HEADER].startswith("req_")
    finally:
        access.removeHandler(handler)
        access.setLevel(old_level)
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]  # one JSON object per line
    assert [(x["path"], x["status"]) for x in lines] == [("/v1/models", 200), ("/v1/nope", 404),
                                                        ("/health", 200)]
    assert lines[0]["request_id"] == "client-id-123" and lines[1]["request_id"] == rid
    assert all(x["level"] == "INFO" and x["duration_ms"] >= 0 for x in lines)
    assert lines[0]["owner"] == auth.ANONYMOUS
