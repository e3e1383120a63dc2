"""End to end on real vLLM engines: the OpenAI SDK -> the gateway -> the real `PoolExecutor` ->
`VllmLauncher` engines (tiny random-weight models on CPU). One app and its engines serve the whole
module (engine starts take ~30 s each); the models are the shared `test_config` ones."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil

import pytest
import pytest_asyncio

from cli.serve import default_executor
from runtime.config import ModelConfig

from .conftest import chat_line, jsonl, poll, read_lines, running

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.engine,
              pytest.mark.timeout(900)]
CHAT = "/v1/chat/completions"


def _chat_batch():
    lines = [chat_line(f"r{i}", model=("tiny-a", "tiny-b")[i % 2], text=f"tell me {i}",
                       max_tokens=6, temperature=0) for i in range(8)]
    lines.append(chat_line("bad-temp", model="tiny-a", temperature=-1.0))  # the engine says 400
    return CHAT, lines


def _completions_batch():
    return "/v1/completions", [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
         "body": {"model": "tiny-b", "prompt": f"the number {i} is", "max_tokens": 5}}
        for i in range(3)]


def _responses_batch():
    # the Responses API on the same engines (pooled with the others: no engine of its own)
    return "/v1/responses", [
        {"custom_id": f"resp{i}", "method": "POST", "url": "/v1/responses",
         "body": {"model": "tiny-b", "input": f"say {i}", "max_output_tokens": 5}}
        for i in range(2)]


def _long_batch():
    # a few short requests finish early; the long ones (ignore_eos) are still running at cancel
    lines = [chat_line(f"s{i}", max_tokens=2) for i in range(3)]
    lines += [chat_line(f"l{i}", max_tokens=900, ignore_eos=True, text=f"long {i}")
              for i in range(24)]
    return CHAT, lines


def _broken_batch():
    # "broken" has a valid config and tokenizer but no weights: its engine fails to start
    lines = [chat_line(f"ok{i}", model="tiny-a", max_tokens=3) for i in range(2)]
    lines += [chat_line(f"broken{i}", model="broken", max_tokens=3) for i in range(2)]
    return CHAT, lines


def _broken_model(tiny_model_dir, root) -> ModelConfig:
    path = root / "broken"
    path.mkdir()
    for f in (tiny_model_dir / "tiny-a").iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, path / f.name)
    return ModelConfig(name="broken", path=str(path), max_model_len=1024, max_num_seqs=32,
                       max_num_batched_tokens=1024, engine_args={"enforce_eager": True})


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def e2e(test_config, tiny_model_dir, tmp_path_factory):
    """One app on real engines; three batches submitted at once (pooled into one job, so engines
    start once), and the long one cancelled as soon as its short requests are done."""
    # the shared test models (tiny-a, tiny-b, small: max_model_len 1024, cores 0-1), own state dir
    server = dataclasses.replace(test_config.server, state_dir=str(tmp_path_factory.mktemp("e2e")))
    broken = _broken_model(tiny_model_dir, tmp_path_factory.mktemp("broken"))
    cfg = dataclasses.replace(test_config, server=server, models=[*test_config.models, broken])
    async with running(cfg, default_executor(cfg)) as srv:
        client = srv.client()
        batches = {}
        for name, (endpoint, lines) in (("chat", _chat_batch()), ("completions",
                                        _completions_batch()), ("responses", _responses_batch()),
                                        ("long", _long_batch()),
                                        ("broken", _broken_batch())):
            f = await client.files.create(file=(f"{name}.jsonl", jsonl(lines)), purpose="batch")
            b = await client.batches.create(input_file_id=f.id, endpoint=endpoint,
                                            completion_window="24h")
            batches[name] = (b.id, lines)

        async def cancel_when_short_ones_done() -> str:
            bid = batches["long"][0]
            await poll(client, bid, lambda x: x.request_counts.completed >= 3, timeout_s=800)
            return (await client.batches.cancel(bid)).status

        canceller = asyncio.create_task(cancel_when_short_ones_done())
        yield srv, client, batches, canceller
        canceller.cancel()


async def test_multi_model_batch_on_real_engines(e2e):
    srv, client, batches, _ = e2e
    bid, lines = batches["chat"]
    done = await poll(client, bid, timeout_s=800)
    assert done.status == "completed", done.errors
    out = await read_lines(client, done.output_file_id)
    err = await read_lines(client, done.error_file_id)
    assert [e["custom_id"] for e in err] == ["bad-temp"]
    assert err[0]["response"]["status_code"] == 400 and err[0]["error"] is None
    ids = [x["custom_id"] for x in out + err]
    assert sorted(ids) == sorted(ln["custom_id"] for ln in lines)  # each exactly once
    assert done.request_counts.total == 9
    assert done.request_counts.completed == len(out) and done.request_counts.failed == len(err)
    by_id = {o["custom_id"]: o for o in out}
    for i in range(8):
        body = by_id[f"r{i}"]["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == ("tiny-a", "tiny-b")[i % 2]
        assert 1 <= body["usage"]["completion_tokens"] <= 6
    assert done.usage.output_tokens == sum(o["response"]["body"]["usage"]["completion_tokens"]
                                           for o in out)
    assert done.usage.input_tokens == sum(o["response"]["body"]["usage"]["prompt_tokens"]
                                          for o in out)
    per_model = done.model_extra["model_request_counts"]
    assert per_model["tiny-a"]["total"] == 5 and per_model["tiny-b"]["total"] == 4
    events = srv.executor.events(bid)
    assert events, "the executor reports what it did for the batch"


async def test_completions_endpoint_on_real_engine(e2e):
    _, client, batches, _ = e2e
    bid, _lines = batches["completions"]
    done = await poll(client, bid, timeout_s=800)
    assert done.status == "completed" and done.request_counts.completed == 3, done
    assert done.model == "tiny-b"
    out = await read_lines(client, done.output_file_id)
    assert [o["custom_id"] for o in out] == ["c0", "c1", "c2"]  # input order
    assert all(o["response"]["body"]["object"] == "text_completion" for o in out)


async def test_responses_endpoint_on_real_engine(e2e):
    """vLLM's own /v1/responses: each line's response body, its usage counted as the batch's."""
    _, client, batches, _ = e2e
    bid, _lines = batches["responses"]
    done = await poll(client, bid, timeout_s=800)
    assert done.status == "completed" and done.request_counts.completed == 2, done
    out = await read_lines(client, done.output_file_id)
    assert [o["custom_id"] for o in out] == ["resp0", "resp1"]
    bodies = [o["response"]["body"] for o in out]
    assert all(b["object"] == "response" and b["model"] == "tiny-b" for b in bodies), bodies
    assert all(1 <= b["usage"]["output_tokens"] <= 5 for b in bodies), bodies
    assert done.usage.output_tokens == sum(b["usage"]["output_tokens"] for b in bodies)
    assert done.usage.input_tokens == sum(b["usage"]["input_tokens"] for b in bodies)


async def test_cancel_mid_run_on_real_engines(e2e):
    _, client, batches, canceller = e2e
    bid, lines = batches["long"]
    assert await canceller in ("cancelling", "cancelled")
    done = await poll(client, bid, timeout_s=120)
    assert done.status == "cancelled", done
    out = await read_lines(client, done.output_file_id)
    err = await read_lines(client, done.error_file_id)
    assert sorted(x["custom_id"] for x in out + err) == sorted(ln["custom_id"] for ln in lines)
    assert done.request_counts.completed == len(out) >= 3
    assert len(out) < len(lines), "cancel arrived after everything finished"
    unfinished = [e for e in err if e["response"] is None]
    assert unfinished and {e["error"]["code"] for e in unfinished} == {"batch_cancelled"}
    assert done.request_counts.failed == len(err) - len(unfinished)


async def test_engine_start_failure_fails_only_that_model(e2e):
    _, client, batches, _ = e2e
    bid, lines = batches["broken"]
    done = await poll(client, bid, timeout_s=800)
    assert done.status == "completed", done
    out = await read_lines(client, done.output_file_id)
    err = await read_lines(client, done.error_file_id)
    assert sorted(o["custom_id"] for o in out) == ["ok0", "ok1"]  # the other model finished
    assert sorted(e["custom_id"] for e in err) == ["broken0", "broken1"]
    for e in err:
        assert e["error"]["code"] in ("engine_start_failed", "planning_failed"), e
        assert e["error"]["message"], "the error line says why"
    assert done.request_counts.completed == 2 and done.request_counts.failed == 2
