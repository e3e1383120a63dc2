"""Every batch-creation validation rule, through the SDK: the batch ends `failed` with
errors.data[{code, line, param}], and no request reaches the executor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_asyncio

from bench.demo_setup import word_tokens
from gateway.tokens import TokenCounter
from gateway.validation import validate_file

from .conftest import chat_line, jsonl, plan_only_config, poll, running

pytestmark = pytest.mark.asyncio(loop_scope="session")

CHAT = "/v1/chat/completions"
GOOD = chat_line("ok-1")


def _with(**changes):
    line = chat_line("bad")
    for k, v in changes.items():
        if k == "body":
            line["body"] = v
        elif v is None:
            line.pop(k, None)
        else:
            line[k] = v
    return line


def _body(**changes):
    body = dict(chat_line("x")["body"])
    for k, v in changes.items():
        if v is None:
            body.pop(k, None)
        else:
            body[k] = v
    return _with(body=body)


DEEP_PROMPT = ('{"custom_id": "p", "method": "POST", "url": "/v1/completions", "body": {"model": '
               '"tiny-a", "prompt": ' + "[" * 900 + "]" * 900 + "}}")  # json.dumps would recurse
MAX_LINE_BYTES = 64 * 1024  # the server's [limits].max_line_bytes

CASES = [
    # (name, lines, endpoint, code, line, param)
    ("invalid json", [GOOD, '{"custom_id": "x", '], CHAT, "invalid_json_line", 2, None),
    ("not an object", [GOOD, "[1, 2]"], CHAT, "invalid_request", 2, None),
    ("missing custom_id", [GOOD, _with(custom_id=None)], CHAT, "missing_custom_id", 2,
     "custom_id"),
    ("non-string custom_id", [GOOD, _with(custom_id=7)], CHAT, "invalid_custom_id", 2,
     "custom_id"),
    ("duplicate custom_id", [GOOD, chat_line("b"), chat_line("ok-1")], CHAT,
     "duplicate_custom_id", 3, "custom_id"),
    ("method not POST", [_with(method="GET")], CHAT, "invalid_method", 1, "method"),
    ("url mismatch", [GOOD, _with(url="/v1/completions")], CHAT, "url_mismatch", 2, "url"),
    ("embeddings on a chat model",
     [{"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
       "body": {"model": "tiny-a", "input": "hi"}}], "/v1/embeddings", "unsupported_endpoint", 1,
     "url"),
    ("chat on an embedding model", [GOOD, _body(model="embedder")], CHAT, "unsupported_endpoint",
     2, "url"),
    ("completions on an embedding model",
     [{"custom_id": "c", "method": "POST", "url": "/v1/completions",
       "body": {"model": "embedder", "prompt": "hi", "max_tokens": 4}}], "/v1/completions",
     "unsupported_endpoint", 1, "url"),
    ("body not an object", [_with(body=[1])], CHAT, "invalid_body", 1, "body"),
    ("missing model", [GOOD, _body(model=None)], CHAT, "missing_model", 2, "body.model"),
    ("model not configured", [_body(model="gpt-9")], CHAT, "model_not_found", 1, "body.model"),
    ("stream true", [GOOD, GOOD | {"custom_id": "s"}, _body(stream=True)], CHAT,
     "stream_unsupported", 3, "body.stream"),
    ("missing messages", [_body(messages=None)], CHAT, "missing_messages", 1, "body.messages"),
    ("missing prompt",
     [{"custom_id": "p", "method": "POST", "url": "/v1/completions",
       "body": {"model": "tiny-a", "max_tokens": 4}}], "/v1/completions", "missing_prompt", 1,
     "body.prompt"),
    ("max_tokens beyond context", [_body(max_tokens=5000)], CHAT, "context_length_exceeded", 1,
     "body.max_tokens"),
    ("prompt beyond context", [_body(messages=[{"role": "user", "content": "w" * 8000}],
                                     max_tokens=None)], CHAT, "context_length_exceeded", 1,
     "body.messages"),
    ("max_tokens not positive", [_body(max_tokens=0)], CHAT, "invalid_max_tokens", 1,
     "body.max_tokens"),
    ("text part not a string",
     [GOOD, _body(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}])], CHAT,
     "invalid_messages", 2, "body.messages[0].content[0].text"),
    ("prompt nested 900 deep", [DEEP_PROMPT], "/v1/completions", "invalid_prompt", 1,
     "body.prompt[0]"),
    ("line over max_line_bytes", [GOOD, chat_line("big", text="x" * 3 * MAX_LINE_BYTES),
                                  chat_line("ok-2")], CHAT, "line_too_long", 2, None),
    ("too many requests", [chat_line(f"r{i}") for i in range(6)], CHAT, "too_many_tasks", 6, None),
    ("only blank lines", ["", "   "], CHAT, "empty_file", None, None),
]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(tmp_path_factory):
    cfg = plan_only_config(tmp_path_factory.mktemp("val"), max_requests_per_batch=5,
                           max_line_bytes=MAX_LINE_BYTES)
    async with running(cfg) as srv:
        yield srv


@pytest.mark.parametrize("name,lines,endpoint,code,line,param", CASES, ids=[c[0] for c in CASES])
async def test_rule(server, name, lines, endpoint, code, line, param):
    client = server.client()
    f = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    b = await client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h")
    done = await poll(client, b.id)
    assert done.status == "failed", done
    assert done.failed_at is not None and done.in_progress_at is None
    first = done.errors.data[0]
    assert (first.code, first.line, first.param) == (code, line, param), done.errors
    assert first.message
    assert done.output_file_id is None and done.error_file_id is None
    assert b.id not in server.executor.submitted  # never half-accepted


async def test_all_errors_reported_with_lines(server):
    client = server.client()
    lines = [GOOD, "nope", _body(model="gpt-9"), chat_line("ok-1"),
             _with(method="PUT", custom_id="c5")]
    f = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    b = await client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    done = await poll(client, b.id)
    got = [(e.code, e.line) for e in done.errors.data]
    assert got == [("invalid_json_line", 2), ("model_not_found", 3), ("duplicate_custom_id", 4),
                   ("invalid_method", 5)]


async def test_embeddings_on_embedding_model_run(server):
    client = server.client()
    line = {"custom_id": "e1", "method": "POST", "url": "/v1/embeddings",
            "body": {"model": "embedder", "input": "some words"}}
    f = await client.files.create(file=("in.jsonl", jsonl([line])), purpose="batch")
    b = await client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings",
                                    completion_window="24h")
    done = await poll(client, b.id)
    assert done.status == "completed" and done.request_counts.completed == 1
    (item,) = server.executor.submitted[b.id]
    assert item.url == "/v1/embeddings" and item.max_tokens == 0


async def test_a_prompt_of_long_single_token_words_is_counted_not_refused(test_config,
                                                                        tmp_path) -> None:
    """The characters-per-token estimate (measured on prose) can be several times off: the tiny
    models' vocabulary holds whole words as one token each (~10 characters), prose only ~2. A
    900-token prompt estimated at ~4,400 tokens must be counted exactly, not refused unseen."""
    words = [w for w in word_tokens(Path(test_config.model("small").path)) if len(w) >= 8]
    text = " ".join(words[i % len(words)] for i in range(900))
    line = {"custom_id": "a", "method": "POST", "url": CHAT,
            "body": {"model": "small", "max_tokens": 16,
                     "messages": [{"role": "user", "content": text}]}}
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(line) + "\n")
    res = validate_file(path, CHAT, test_config, TokenCounter(test_config))
    assert res.ok, res.errors
    assert 900 <= res.items[0].prompt_tokens < 1000
