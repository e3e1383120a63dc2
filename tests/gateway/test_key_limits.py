"""`[limits].max_queued_requests_per_key`: a create that would take one key's queued requests past
the limit is a 429 in OpenAI's rate-limit shape; other keys, and 0, are not limited."""

from __future__ import annotations

import asyncio
import codecs
import random
import sqlite3

import aiohttp
import openai
import pytest

import gateway.lines as lines_mod
from gateway.db import MIGRATIONS, Database
from gateway.lines import iter_lines
from gateway.state import SERVICE
from runtime.config import ConfigError

from .conftest import chat_line, jsonl, plan_only_config, poll, running

session = pytest.mark.asyncio(loop_scope="session")
CHAT = "/v1/chat/completions"
KEYS = ["sk-alice-123456", "sk-bob-12345678"]
FIELD = "max_queued_requests_per_key"


async def _upload(client, n: int, tag: str = "r", blank: int = 0):
    lines = [chat_line(f"{tag}{i}") for i in range(n)] + [""] * blank
    return await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")


async def _create(client, file_id: str):
    return await client.batches.create(input_file_id=file_id, endpoint=CHAT,
                                       completion_window="24h")


async def _running(client, n: int, tag: str = "r"):
    b = await _create(client, (await _upload(client, n, tag)).id)
    return await poll(client, b.id, lambda x: x.status == "in_progress")


async def _refused(client, file_id: str) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as exc:
        await _create(client, file_id)
    return exc.value


@session
async def test_over_the_limit_is_429_in_openai_shape(tmp_path):
    cfg = plan_only_config(tmp_path, api_keys=KEYS, **{FIELD: 5})
    async with running(cfg) as srv:
        srv.executor.hold()
        alice = srv.client(KEYS[0], max_retries=0)
        await _running(alice, 3, "a")
        await _create(alice, (await _upload(alice, 2, "b")).id)  # 3 + 2 = 5: exactly the limit
        extra = await _upload(alice, 1, "c")
        err = await _refused(alice, extra.id)
        assert err.status_code == 429
        assert err.response.headers["x-should-retry"] == "true"
        assert "retry-after" not in err.response.headers
        assert err.body == {"message": err.body["message"], "type": "requests", "param": None,
                            "code": "rate_limit_exceeded"}
        msg = err.body["message"]
        assert "5 requests queued" in msg and "adds 1" in msg and "limit is 5" in msg
        assert f"[limits].{FIELD}" in msg and "API key" in msg
        async with aiohttp.ClientSession() as http:  # the envelope on the wire
            async with http.post(f"{srv.url}/v1/batches", headers={
                    "Authorization": f"Bearer {KEYS[0]}"}, json={
                    "input_file_id": extra.id, "endpoint": CHAT,
                    "completion_window": "24h"}) as r:
                assert r.status == 429 and r.headers["x-should-retry"] == "true"
                assert await r.json() == {"error": err.body}
        assert len([b async for b in alice.batches.list()]) == 2  # nothing made for a refusal
        srv.executor.release(10)


@session
async def test_sdk_retries_then_raises(tmp_path):
    """`x-should-retry: true`: the SDK retries the 429 on its own, and raises RateLimitError once
    its retries are spent."""
    cfg = plan_only_config(tmp_path, **{FIELD: 1})
    async with running(cfg) as srv:
        srv.executor.hold()
        client = srv.client(max_retries=1)
        await _running(client, 1)
        f = await _upload(client, 1, "x")
        calls = []

        async def count(request):
            calls.append(request.url.path)

        client._client.event_hooks["request"].append(count)
        err = await _refused(client, f.id)
        assert calls == ["/v1/batches", "/v1/batches"]
        assert "every caller shares one queue" in err.body["message"]  # no keys: one owner
        srv.executor.release(10)


@session
async def test_key_submits_again_after_requests_finish_or_cancel(tmp_path):
    cfg = plan_only_config(tmp_path, api_keys=KEYS, **{FIELD: 3})
    async with running(cfg) as srv:
        srv.executor.hold()
        alice = srv.client(KEYS[0], max_retries=0)
        a = await _running(alice, 3, "a")
        one = await _upload(alice, 1, "b")
        assert "3 requests queued" in (await _refused(alice, one.id)).body["message"]
        srv.executor.release(1)  # one of a's requests finishes: room for one more
        await poll(alice, a.id, lambda x: x.request_counts.completed == 1)
        b = await _create(alice, one.id)
        assert "3 requests queued" in (await _refused(alice, one.id)).body["message"]
        await alice.batches.cancel(a.id)
        assert (await poll(alice, a.id)).status == "cancelled"  # its 2 unfinished ones leave
        await _create(alice, one.id)
        await _create(alice, one.id)
        assert "3 requests queued" in (await _refused(alice, one.id)).body["message"]
        srv.executor.release(10)
        assert (await poll(alice, b.id)).status == "completed"
        await _create(alice, one.id)


@session
async def test_other_key_is_not_limited(tmp_path):
    cfg = plan_only_config(tmp_path, api_keys=KEYS, **{FIELD: 2})
    async with running(cfg) as srv:
        srv.executor.hold()
        alice, bob = srv.client(KEYS[0], max_retries=0), srv.client(KEYS[1], max_retries=0)
        await _running(alice, 2, "a")
        await _refused(alice, (await _upload(alice, 1)).id)
        b = await _create(bob, (await _upload(bob, 2)).id)  # alice's 2 never count for bob
        await poll(bob, b.id, lambda x: x.status == "in_progress")
        err = await _refused(bob, (await _upload(bob, 1)).id)
        assert "2 requests queued" in err.body["message"]
        srv.executor.release(10)


@session
async def test_zero_is_no_limit(tmp_path):
    cfg = plan_only_config(tmp_path)
    assert getattr(cfg.limits, FIELD) == 0  # the default
    async with running(cfg) as srv:
        srv.executor.hold()
        client = srv.client()
        f = await _upload(client, 20)
        made = [await _create(client, f.id) for _ in range(5)]
        for b in made:
            await poll(client, b.id, lambda x: x.status == "in_progress")
        srv.executor.release(1000)


@session
async def test_concurrent_creates_never_pass_the_limit(tmp_path):
    cfg = plan_only_config(tmp_path, api_keys=KEYS, **{FIELD: 5})
    async with running(cfg) as srv:
        srv.executor.hold()
        alice, bob = srv.client(KEYS[0], max_retries=0), srv.client(KEYS[1], max_retries=0)
        fa, fb = await _upload(alice, 2), await _upload(bob, 2)
        got = await asyncio.gather(*[_create(alice, fa.id) for _ in range(8)],
                                   *[_create(bob, fb.id) for _ in range(8)],
                                   return_exceptions=True)
        for mine in (got[:8], got[8:]):  # each key: 2 + 2 fit in 5, a third batch does not
            assert sum(isinstance(x, openai.RateLimitError) for x in mine) == 6, mine
            assert sum(isinstance(x, openai.types.Batch) for x in mine) == 2, mine
        service = srv.app[SERVICE]
        owners = {row["owner"] for row in service.db.batches_in(("validating", "in_progress"))}
        assert len(owners) == 2 and all(service.queued_requests(o) == 4 for o in owners)
        srv.executor.release(100)


@session
async def test_blank_lines_do_not_count_and_a_batch_over_the_whole_limit_is_400(tmp_path):
    cfg = plan_only_config(tmp_path, **{FIELD: 2})
    async with running(cfg) as srv:
        srv.executor.hold()
        client = srv.client(max_retries=0)
        b = await _create(client, (await _upload(client, 2, blank=3)).id)
        assert (await poll(client, b.id, lambda x: x.status != "validating")).status \
            == "in_progress"
        with pytest.raises(openai.BadRequestError) as exc:  # 3 > 2 never fits: not a 429
            await _create(client, (await _upload(client, 3, "x")).id)
        assert exc.value.body["code"] == "too_many_tasks"
        assert exc.value.body["param"] == "input_file_id"
        assert f"[limits].{FIELD}" in exc.value.body["message"]
        srv.executor.release(10)


def test_config_rejects_a_negative_limit(tmp_path):
    with pytest.raises(ConfigError, match=rf"limits\.{FIELD}: must be 0"):
        plan_only_config(tmp_path, **{FIELD: -1})
    assert getattr(plan_only_config(tmp_path, **{FIELD: 7}).limits, FIELD) == 7


def test_count_lines_matches_validation(tmp_path, monkeypatch):
    """Non-blank lines as validation reads them (BOM, whitespace-only lines, no final newline),
    whatever block boundaries fall on."""
    rnd = random.Random(7)
    parts = [b'{"a": 1}', b"x", b"\n", b"\n\n", b" ", b"\r", b"\t", b"\x0b", b"\r\n",
             codecs.BOM_UTF8]
    path = tmp_path / "f"
    for trial in range(1500):
        monkeypatch.setattr(lines_mod, "COUNT_BYTES", rnd.choice([3, 4, 7, 16, 1 << 20]))
        data = (codecs.BOM_UTF8 if trial % 3 == 0 else b"") + b"".join(
            rnd.choice(parts) for _ in range(rnd.randint(0, 40)))
        path.write_bytes(data)
        want = sum(1 for _, _, raw in iter_lines(path) if bytes(raw).strip())
        assert lines_mod.count_lines(path) == want, data


def test_migration_adds_the_count_column(tmp_path):
    """A database made before the column (schema version 1) opens with it, and its live batches
    count from their stored request_counts."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for stmt in MIGRATIONS[0]:
        conn.execute(stmt)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO batches (id, owner, endpoint, input_file_id, completion_window, "
                 "status, created_at, request_counts, model_request_counts) VALUES "
                 "('batch_1', 'o', ?, 'file-1', '24h', 'in_progress', 0, "
                 "'{\"total\": 4, \"completed\": 1, \"failed\": 1}', '{}')", (CHAT,))
    conn.commit()
    conn.close()
    db = Database(path)
    [row] = db.owner_batches_in("o", ("in_progress",))
    assert row["input_lines"] is None and row["request_counts"]["total"] == 4
    assert db.owner_batches_in("someone-else", ("in_progress",)) == []
    db.close()
