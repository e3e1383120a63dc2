"""The README flow through the official SDK against the gateway with an executor double."""

from __future__ import annotations

import pytest

from .conftest import chat_line, jsonl, poll, read_lines, running

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_upload_create_poll_download(cfg):
    lines = [chat_line(f"r{i}", model="tiny-a" if i % 2 else "tiny-b", text=f"q{i}")
             for i in range(10)]
    lines[3] = chat_line("r3", text="please FAIL")
    lines[6] = chat_line("r6", model="tiny-b", text="CRASH")
    async with running(cfg) as srv:
        client = srv.client()
        f = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        assert f.id.startswith("file-") and f.purpose == "batch" and f.bytes == len(jsonl(lines))
        assert f.filename == "in.jsonl" and f.status == "processed"
        b = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                        completion_window="24h", metadata={"team": "x"})
        assert b.id.startswith("batch_") and b.status == "validating"
        assert b.expires_at == b.created_at + 86400 and b.metadata == {"team": "x"}
        done = await poll(client, b.id)
        assert done.status == "completed", done
        assert done.request_counts.total == 10
        assert (done.request_counts.completed, done.request_counts.failed) == (8, 2)
        assert done.model is None  # two models
        per_model = done.model_extra["model_request_counts"]
        assert per_model["tiny-a"]["total"] == 5 and per_model["tiny-b"]["total"] == 5
        assert per_model["tiny-a"]["failed"] == 1 and per_model["tiny-b"]["failed"] == 1
        for ts in ("in_progress_at", "finalizing_at", "completed_at"):
            assert getattr(done, ts) is not None
        assert done.in_progress_at <= done.finalizing_at <= done.completed_at
        out = await read_lines(client, done.output_file_id)
        err = await read_lines(client, done.error_file_id)
        assert [o["custom_id"] for o in out] == [f"r{i}" for i in range(10) if i not in (3, 6)]
        assert [e["custom_id"] for e in err] == ["r3", "r6"]
        assert err[0]["response"]["status_code"] == 400 and err[0]["error"] is None
        assert err[0]["response"]["body"]["error"]["message"] == "simulated engine rejection"
        assert err[1]["response"] is None and err[1]["error"]["code"] == "engine_failed"
        for o in out:
            assert o["id"].startswith("batch_req_") and o["error"] is None
            assert o["response"]["status_code"] == 200
            assert o["response"]["body"]["choices"][0]["message"]["content"].startswith("echo")
        usage = done.usage
        assert usage.output_tokens == 8 * 3
        assert usage.input_tokens == sum(o["response"]["body"]["usage"]["prompt_tokens"]
                                         for o in out)
        assert usage.total_tokens == usage.input_tokens + usage.output_tokens
        out_file = await client.files.retrieve(done.output_file_id)
        assert out_file.purpose == "batch_output"
        assert out_file.bytes == len((await client.files.content(done.output_file_id)).content)


async def test_single_model_batch_names_model_and_passes_strategy(cfg):
    async with running(cfg) as srv:
        client = srv.client()
        f = await client.files.create(file=("a.jsonl", jsonl([chat_line("a"), chat_line("b")])),
                                      purpose="batch")
        b = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                        completion_window="24h",
                                        metadata={"strategy": "sequential"})
        done = await poll(client, b.id)
        assert done.status == "completed" and done.model == "tiny-a"
        assert srv.executor.strategies[b.id] == "sequential"
        items = srv.executor.submitted[b.id]
        assert [(it.line, it.custom_id, it.max_tokens) for it in items] == [(1, "a", 8), (2, "b", 8)]
        assert all(it.prompt_tokens > 0 for it in items)


async def test_models_health_metrics(cfg):
    async with running(cfg) as srv:
        client = srv.client()
        models = [m async for m in client.models.list()]
        assert [m.id for m in models] == ["tiny-a", "tiny-b", "embedder"]
        # an extension field the SDK passes through: the endpoints each model serves
        assert [m.model_extra["endpoints"] for m in models] == [
            ["/v1/chat/completions", "/v1/completions", "/v1/responses"]] * 2 + [["/v1/embeddings"]]
        f = await client.files.create(file=("a.jsonl", jsonl([chat_line("a", model="tiny-b")])),
                                      purpose="batch")
        b = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
        await poll(client, b.id)
        http = client._client  # the SDK's own httpx client
        health = await http.get(f"{srv.url}/health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        text = (await http.get(f"{srv.url}/metrics")).text
        assert 'samullm_batches{status="completed"} 1.0' in text
        assert 'samullm_requests_total{model="tiny-b",result="completed"} 1.0' in text
        assert 'samullm_tokens_total{kind="output",model="tiny-b"} 3.0' in text
        assert "samullm_queue_depth 0.0" in text
