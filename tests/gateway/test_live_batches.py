"""The gateway tells the composition root how many batches are live (`create_app(...,
on_live_batches=)`): a batch counts from its creation, while it validates (before the executor
hears of it), until it ended; `samullm serve` stops background profiling on it."""

from __future__ import annotations

import asyncio

from .conftest import chat_line, jsonl, poll, running
from .doubles import EchoExecutor


async def test_a_batch_is_live_from_its_creation_until_it_ended(cfg) -> None:
    told: list[int] = []
    executor = EchoExecutor()
    executor.hold()  # its requests wait: the batch stays in progress
    async with running(cfg, executor, on_live_batches=told.append) as srv:
        client = srv.client()
        f = await client.files.create(file=("a.jsonl", jsonl([chat_line("a")])), purpose="batch")
        b = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
        assert told == [1]  # by the time the create answered: before validation ended
        await poll(client, b.id, lambda x: x.status == "in_progress")
        executor.release(1)
        await poll(client, b.id)
        for _ in range(100):
            if told[-1] == 0:
                break
            await asyncio.sleep(0.01)
        assert told == [1, 0]
        bad = await client.files.create(file=("b.jsonl", jsonl(["not json"])), purpose="batch")
        failed = await client.batches.create(input_file_id=bad.id,
                                             endpoint="/v1/chat/completions",
                                             completion_window="24h")
        assert (await poll(client, failed.id)).status == "failed"
        for _ in range(100):
            if told[-1] == 0:
                break
            await asyncio.sleep(0.01)
        assert told == [1, 0, 1, 0]  # a batch that never reached the executor ends its count too
