"""`/v1/batches` through the SDK: listing with auto-paging, cancel, expiry, errors, auth."""

from __future__ import annotations

import asyncio

import openai
import pytest

from .conftest import Clock, chat_line, jsonl, plan_only_config, poll, read_lines, running

pytestmark = pytest.mark.asyncio(loop_scope="session")
CHAT = "/v1/chat/completions"


async def _batch(client, lines, **kw):
    f = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    return await client.batches.create(input_file_id=f.id, endpoint=kw.pop("endpoint", CHAT),
                                       completion_window=kw.pop("completion_window", "24h"), **kw)


async def test_list_autopaging_walks_every_batch_once(cfg):
    async with running(cfg) as srv:
        client = srv.client()
        f = await client.files.create(file=("bad.jsonl", b"not json\n"), purpose="batch")
        created = [(await client.batches.create(input_file_id=f.id, endpoint=CHAT,
                                                completion_window="24h")).id for _ in range(105)]
        walked = [b.id async for b in client.batches.list(limit=100)]
        assert walked == created[::-1]  # newest first, each exactly once
        small = [b.id async for b in client.batches.list(limit=7)]
        assert small == walked
        first = await client.batches.list()
        assert len(first.data) == 20 and first.has_more
        last = await client.batches.list(after=walked[-2])
        assert [b.id for b in last.data] == [walked[-1]] and last.has_more is False
        for bad in (0, 101):
            with pytest.raises(openai.BadRequestError):
                await client.batches.list(limit=bad)


async def test_cancel_mid_run_keeps_partial_output(cfg):
    lines = [chat_line(f"r{i}", model=("tiny-a", "tiny-b")[i % 2]) for i in range(10)]
    async with running(cfg) as srv:
        srv.executor.hold()
        client = srv.client()
        b = await _batch(client, lines)
        await poll(client, b.id, lambda x: x.status == "in_progress")
        srv.executor.release(4)
        mid = await poll(client, b.id, lambda x: x.request_counts.completed == 4)
        assert mid.status == "in_progress" and mid.request_counts.total == 10
        cancelling = await client.batches.cancel(b.id)
        assert cancelling.status in ("cancelling", "cancelled")
        assert cancelling.cancelling_at is not None
        done = await poll(client, b.id)
        assert done.status == "cancelled" and done.cancelled_at is not None
        assert (done.request_counts.total, done.request_counts.completed,
                done.request_counts.failed) == (10, 4, 0)
        out = await read_lines(client, done.output_file_id)
        err = await read_lines(client, done.error_file_id)
        assert len(out) == 4 and len(err) == 6
        assert sorted(x["custom_id"] for x in out + err) == sorted(f"r{i}" for i in range(10))
        assert {e["error"]["code"] for e in err} == {"batch_cancelled"}
        assert all(e["response"] is None for e in err)
        # cancelling again is harmless; a finished batch cannot be cancelled
        assert (await client.batches.cancel(b.id)).status == "cancelled"


async def test_cancel_finished_batch_is_409_without_retry(cfg):
    async with running(cfg) as srv:
        client = srv.client(max_retries=2)
        b = await _batch(client, [chat_line("a")])
        await poll(client, b.id)
        with pytest.raises(openai.ConflictError) as exc:
            await client.batches.cancel(b.id)
        assert exc.value.response.headers["x-should-retry"] == "false"
        assert "completed" in exc.value.message
        body = exc.value.body
        assert set(body) == {"message", "type", "param", "code"}


async def test_expiry_writes_batch_expired_lines(cfg):
    clock = Clock()
    async with running(cfg, clock=clock, expiry_interval_s=0.02) as srv:
        srv.executor.hold()
        client = srv.client()
        b = await _batch(client, [chat_line(f"r{i}") for i in range(5)], completion_window="1h")
        assert b.expires_at == b.created_at + 3600
        await poll(client, b.id, lambda x: x.status == "in_progress")
        srv.executor.release(2)
        await poll(client, b.id, lambda x: x.request_counts.completed == 2)
        clock.offset = 3601
        done = await poll(client, b.id)
        assert done.status == "expired" and done.expired_at is not None
        assert done.request_counts.completed == 2
        out = await read_lines(client, done.output_file_id)
        err = await read_lines(client, done.error_file_id)
        assert [o["custom_id"] for o in out] == ["r0", "r1"] or len(out) == 2
        assert [e["error"]["code"] for e in err] == ["batch_expired"] * 3
        assert sorted(x["custom_id"] for x in out + err) == [f"r{i}" for i in range(5)]


async def test_create_errors(cfg):
    async with running(cfg) as srv:
        client = srv.client()
        f = await client.files.create(file=("in.jsonl", jsonl([chat_line("a")])), purpose="batch")
        with pytest.raises(openai.NotFoundError):
            await client.batches.create(input_file_id="file-nope", endpoint=CHAT,
                                        completion_window="24h")
        with pytest.raises(openai.BadRequestError) as exc:
            await client.batches.create(input_file_id=f.id, endpoint=CHAT,
                                        completion_window="7d")
        assert exc.value.param == "completion_window"
        bad_meta = [{f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513},
                    {"strategy": "magic"}]
        for meta in bad_meta:
            with pytest.raises(openai.BadRequestError):
                await client.batches.create(input_file_id=f.id, endpoint=CHAT,
                                            completion_window="24h", metadata=meta)
        ok_meta = {f"k{i}": "v" * 512 for i in range(16)}
        b = await client.batches.create(input_file_id=f.id, endpoint=CHAT,
                                        completion_window="24h", metadata=ok_meta)
        assert b.metadata == ok_meta
        other = await client.files.create(file=("u.txt", b"hi"), purpose="user_data")
        with pytest.raises(openai.BadRequestError):
            await client.batches.create(input_file_id=other.id, endpoint=CHAT,
                                        completion_window="24h")
        with pytest.raises(openai.NotFoundError):
            await client.batches.retrieve("batch_nope")
        with pytest.raises(openai.NotFoundError):
            await client.batches.cancel("batch_nope")
        http = client._client
        r = await http.post(f"{srv.url}/v1/batches", content=b"{not json",
                            headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


async def test_auth_keys_and_ownership(tmp_path):
    keys = ["sk-alice-123456", "sk-bob-12345678"]
    cfg = plan_only_config(tmp_path, api_keys=keys)
    async with running(cfg) as srv:
        alice, bob = srv.client(keys[0]), srv.client(keys[1])
        with pytest.raises(openai.AuthenticationError):
            await srv.client("sk-wrong-key-000").files.list()
        async with srv.client(keys[0]) as c:
            r = await c._client.get(f"{srv.url}/v1/files")
            assert r.status_code == 401  # no Authorization header at all
            assert (await c._client.get(f"{srv.url}/health")).status_code == 200
        b = await _batch(alice, [chat_line("a")])
        done = await poll(alice, b.id)
        for call in (bob.batches.retrieve(b.id), bob.batches.cancel(b.id),
                     bob.files.retrieve(b.input_file_id), bob.files.content(done.output_file_id),
                     bob.files.delete(b.input_file_id)):
            with pytest.raises(openai.NotFoundError):
                await call
        assert [x async for x in bob.batches.list()] == []
        assert [x async for x in bob.files.list()] == []
        assert [x.id async for x in alice.batches.list()] == [b.id]


async def test_auth_other_keys_file_is_404(tmp_path):
    keys = ["sk-alice-123456", "sk-bob-12345678"]
    async with running(plan_only_config(tmp_path, api_keys=keys)) as srv:
        f = await srv.client(keys[0]).files.create(file=("in.jsonl", jsonl([chat_line("a")])),
                                                   purpose="batch")
        with pytest.raises(openai.NotFoundError):
            await srv.client(keys[1]).batches.create(input_file_id=f.id, endpoint=CHAT,
                                                     completion_window="24h")


async def test_live_counts_move(cfg):
    async with running(cfg) as srv:
        srv.executor.hold()
        client = srv.client()
        b = await _batch(client, [chat_line(f"r{i}") for i in range(6)])
        seen = []
        for n in (0, 2, 5, 6):
            srv.executor.release(n - (seen[-1] if seen else 0))
            got = await poll(client, b.id, lambda x, n=n: x.request_counts.completed == n
                             and x.status != "validating")
            seen.append(got.request_counts.completed)
            await asyncio.sleep(0)
        assert seen == [0, 2, 5, 6]
        assert (await poll(client, b.id)).status == "completed"
