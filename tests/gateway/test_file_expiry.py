"""File expiry through the SDK: `expires_after` on upload and `output_expires_after` on batch
create are validated (3600 s to 30 days, anchor created_at), set `expires_at`, and the gateway's
background sweep deletes expired files, content and row, on its own clock; a batch whose input file
expires keeps running on what it accepted and the input's bytes go once it is terminal."""

from __future__ import annotations

import asyncio

import openai
import pytest

from .conftest import Clock, chat_line, jsonl, poll, read_lines, running

pytestmark = pytest.mark.asyncio(loop_scope="session")
CHAT = "/v1/chat/completions"
HOUR = 3600


async def _until(cond, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_expires_after_is_validated(cfg):
    async with running(cfg) as srv:
        client = srv.client()
        data = jsonl([chat_line("a")])
        for policy, param in (({"anchor": "created_at", "seconds": 10}, "expires_after.seconds"),
                              ({"anchor": "created_at", "seconds": 2592001},
                               "expires_after.seconds"),
                              ({"anchor": "last_active_at", "seconds": HOUR},
                               "expires_after.anchor")):
            with pytest.raises(openai.BadRequestError) as exc:
                await client.files.create(file=("a.jsonl", data), purpose="batch",
                                          expires_after=policy)  # type: ignore[arg-type]
            assert exc.value.param == param and exc.value.type == "invalid_request_error"
        assert [f async for f in client.files.list()] == []
        assert list((cfg.state_dir / "files").iterdir()) == []
        f = await client.files.create(file=("a.jsonl", data), purpose="batch",
                                      expires_after={"anchor": "created_at", "seconds": HOUR})
        assert f.expires_at == f.created_at + HOUR
        assert (await client.files.retrieve(f.id)).expires_at == f.expires_at
        plain = await client.files.create(file=("b.jsonl", data), purpose="batch")
        assert plain.expires_at is None
        for policy, param in (({"anchor": "created_at", "seconds": 5},
                               "output_expires_after.seconds"),
                              ({"anchor": "nope", "seconds": HOUR}, "output_expires_after.anchor")):
            with pytest.raises(openai.BadRequestError) as exc:
                await client.batches.create(input_file_id=f.id, endpoint=CHAT,
                                            completion_window="24h",
                                            output_expires_after=policy)  # type: ignore[arg-type]
            assert exc.value.param == param
        assert [b async for b in client.batches.list()] == []


async def test_expired_files_are_deleted_and_a_running_batch_keeps_its_input(cfg):
    clock = Clock()
    async with running(cfg, clock=clock, expiry_interval_s=0.05) as srv:
        client = srv.client()
        srv.executor.hold()
        lines = [chat_line(f"r{i}", text=f"q{i}") for i in range(4)]
        f = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch",
                                      expires_after={"anchor": "created_at", "seconds": HOUR})
        other = await client.files.create(file=("pic.bin", b"\x00\xff"), purpose="user_data",
                                          expires_after={"anchor": "created_at", "seconds": HOUR})
        b = await client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h",
                                        output_expires_after={"anchor": "created_at",
                                                              "seconds": 2 * HOUR})
        await poll(client, b.id, lambda x: x.status == "in_progress")
        srv.executor.release(1)
        clock.offset = HOUR + 1  # both files expire; the batch (24 h) does not
        stored = cfg.state_dir / "files"
        await _until(lambda: not (stored / other.id).exists())
        for fid in (f.id, other.id):  # both read as deleted at once
            with pytest.raises(openai.NotFoundError):
                await client.files.retrieve(fid)
            with pytest.raises(openai.NotFoundError):
                await client.files.content(fid)
        assert [x.id async for x in client.files.list()] == []
        with pytest.raises(openai.NotFoundError):  # no new batch on an expired file
            await client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
        assert (stored / f.id).is_file()  # the running batch still reads its bodies from it
        srv.executor.release(3)
        done = await poll(client, b.id)
        assert done.status == "completed" and done.request_counts.completed == 4, done
        out = await client.files.retrieve(done.output_file_id)
        assert out.expires_at == out.created_at + 2 * HOUR
        assert [o["custom_id"] for o in await read_lines(client, out.id)] == [
            f"r{i}" for i in range(4)]
        await _until(lambda: not (stored / f.id).exists())  # terminal now: the input goes
        clock.offset = 3 * HOUR + 2
        await _until(lambda: not (stored / out.id).exists())
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(out.id)
        assert sorted(p.name for p in stored.iterdir()) == []
