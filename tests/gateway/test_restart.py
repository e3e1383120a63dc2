"""Durability: a new app on the same state dir resumes what the old one left, losing nothing and
running nothing twice."""

from __future__ import annotations

import sqlite3

import pytest

from gateway.journal import journal_path

from .conftest import chat_line, jsonl, poll, read_lines, running
from .doubles import EchoExecutor

pytestmark = pytest.mark.asyncio(loop_scope="session")
CHAT = "/v1/chat/completions"


async def test_restart_mid_batch_resumes_without_loss(cfg):
    lines = [chat_line(f"r{i}", model=("tiny-a", "tiny-b")[i % 3 == 0],
                       text="FAIL" if i == 7 else f"q{i}") for i in range(10)]
    async with running(cfg) as srv:
        srv.executor.hold()
        client = srv.client()
        f = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        b = await client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
        await poll(client, b.id, lambda x: x.status == "in_progress")
        srv.executor.release(4)
        await poll(client, b.id, lambda x: x.request_counts.completed == 4)
        first_done = {it.custom_id for it in srv.executor.submitted[b.id][:4]}
    # a crash mid-append leaves a torn line: the journal must shrug it off
    with open(journal_path(cfg.state_dir, b.id), "ab") as j:
        j.write(b'{"custom_id": "r9", "line": 10, "mod')
    ex2 = EchoExecutor()
    async with running(cfg, ex2) as srv2:
        client = srv2.client()
        assert (await client.files.retrieve(f.id)).bytes == len(jsonl(lines))
        done = await poll(client, b.id)
        assert done.status == "completed"
        resubmitted = {it.custom_id for it in ex2.submitted[b.id]}
        assert resubmitted == {f"r{i}" for i in range(10)} - first_done
        assert (done.request_counts.total, done.request_counts.completed,
                done.request_counts.failed) == (10, 9, 1)
        out = await read_lines(client, done.output_file_id)
        err = await read_lines(client, done.error_file_id)
        ids = [x["custom_id"] for x in out + err]
        assert sorted(ids) == sorted(f"r{i}" for i in range(10))  # each exactly once
        assert [x["custom_id"] for x in out] == [f"r{i}" for i in range(10) if i != 7]


async def test_restart_refinalizes_and_revalidates(cfg):
    async with running(cfg) as srv:
        client = srv.client()
        f = await client.files.create(file=("in.jsonl", jsonl([chat_line("a"), chat_line("b")])),
                                      purpose="batch")
        fin = await client.batches.create(input_file_id=f.id, endpoint=CHAT,
                                          completion_window="24h")
        val = await client.batches.create(input_file_id=f.id, endpoint=CHAT,
                                          completion_window="24h")
        first = await poll(client, fin.id)
        await poll(client, val.id)
        first_out = (await client.files.content(first.output_file_id)).content
    # simulate crashes: one batch died while finalizing, the other while validating
    db = sqlite3.connect(cfg.state_dir / "samullm.db")
    db.execute("UPDATE batches SET status='finalizing', completed_at=NULL, output_file_id=NULL "
               "WHERE id=?", (fin.id,))
    db.execute("UPDATE batches SET status='validating', in_progress_at=NULL, finalizing_at=NULL, "
               "completed_at=NULL, output_file_id=NULL WHERE id=?", (val.id,))
    db.commit()
    db.close()
    journal_path(cfg.state_dir, val.id).unlink()
    ex2 = EchoExecutor()
    async with running(cfg, ex2) as srv2:
        client = srv2.client()
        again = await poll(client, fin.id)
        assert again.status == "completed" and again.output_file_id == first.output_file_id
        assert (await client.files.content(again.output_file_id)).content == first_out
        assert fin.id not in ex2.submitted  # finalizing re-runs nothing
        revalidated = await poll(client, val.id)
        assert revalidated.status == "completed" and revalidated.request_counts.completed == 2
        assert len(ex2.submitted[val.id]) == 2
        outputs = [x async for x in client.files.list(purpose="batch_output")]
        assert len(outputs) == 2  # re-finalizing did not leak a second output file


async def test_cancelling_batch_finishes_cancelling_after_restart(cfg):
    async with running(cfg) as srv:
        srv.executor.hold()
        client = srv.client()
        f = await client.files.create(file=("in.jsonl", jsonl([chat_line("a"), chat_line("b")])),
                                      purpose="batch")
        b = await client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
        await poll(client, b.id, lambda x: x.status == "in_progress")
        srv.executor.release(1)
        await poll(client, b.id, lambda x: x.request_counts.completed == 1)
    db = sqlite3.connect(cfg.state_dir / "samullm.db")
    db.execute("UPDATE batches SET status='cancelling', cancelling_at=1 WHERE id=?", (b.id,))
    db.commit()
    db.close()
    async with running(cfg) as srv2:
        client = srv2.client()
        done = await poll(client, b.id)
        assert done.status == "cancelled" and done.request_counts.completed == 1
        err = await read_lines(client, done.error_file_id)
        assert [e["error"]["code"] for e in err] == ["batch_cancelled"]
        assert b.id not in srv2.executor.submitted
