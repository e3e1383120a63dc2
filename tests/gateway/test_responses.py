"""`/v1/responses` batches through the SDK: accepted as an endpoint and line url, `input` validated
(a string or Responses API input items), prompts counted for planning, output lines with the
response object; `depends_on` is refused on responses lines (placeholders fill chat and completions
prompts only)."""

from __future__ import annotations

import pytest

from gateway.tokens import TokenCounter
from gateway.validation import validate_file

from .conftest import jsonl, poll, read_lines, running

pytestmark = pytest.mark.asyncio(loop_scope="session")
RESPONSES = "/v1/responses"


def resp_line(cid: str, input: object = "hello", model: str = "tiny-a", **extra: object) -> dict:
    body = {"model": model, "input": input, "max_output_tokens": 8} | extra.pop("body", {})
    return {"custom_id": cid, "method": "POST", "url": RESPONSES, "body": body} | extra


ITEMS = [{"role": "system", "content": "Be brief."},
         {"type": "message", "role": "user",
          "content": [{"type": "input_text", "text": "What is 2+2?"},
                      {"type": "input_image", "image_url": "https://x/y.png"}]},
         {"type": "function_call_output", "call_id": "c1", "output": "4"}]


async def _run(client, lines):
    f = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    b = await client.batches.create(input_file_id=f.id, endpoint=RESPONSES, completion_window="24h")
    return b, await poll(client, b.id)


async def test_responses_batch_runs_and_writes_response_objects(cfg):
    lines = [resp_line("s", "Say hi"), resp_line("i", ITEMS, model="tiny-b",
                                                 body={"instructions": "You are terse."})]
    async with running(cfg) as srv:
        client = srv.client()
        b, done = await _run(client, lines)
        assert done.status == "completed" and done.request_counts.completed == 2, done
        items = {it.custom_id: it for it in srv.executor.submitted[b.id]}
        assert items["s"].url == RESPONSES and items["s"].max_tokens == 8
        assert items["s"].body == lines[0]["body"]  # sent to the engine as is
        assert items["i"].prompt_tokens > items["s"].prompt_tokens > 0  # counted like chat
        out = await read_lines(client, done.output_file_id)
        assert [o["custom_id"] for o in out] == ["s", "i"]
        body = out[0]["response"]["body"]
        assert body["object"] == "response" and body["output"][0]["content"][0]["text"]
        assert done.usage.output_tokens == 6  # the Responses API's usage names are counted
        assert done.usage.input_tokens == sum(it.prompt_tokens for it in items.values())


RULES = [
    ("input not a string or list", [resp_line("a", 5)], "invalid_input", "body.input"),
    ("empty input list", [resp_line("a", [])], "invalid_input", "body.input"),
    ("item not an object", [resp_line("a", ["hi"])], "invalid_input", "body.input[0]"),
    ("item without type or role", [resp_line("a", [{"content": "hi"}])], "invalid_input",
     "body.input[0].type"),
    ("text part without text", [resp_line("a", [{"role": "user", "content": [
        {"type": "input_text", "text": 5}]}])], "invalid_input", "body.input[0].content[0]"),
    ("content not string or parts", [resp_line("a", [{"role": "user", "content": 3}])],
     "invalid_input", "body.input[0].content"),
    ("missing input", [resp_line("a", None)], "missing_input", "body.input"),
    ("model not configured", [resp_line("a", model="gpt-9")], "model_not_found", "body.model"),
    ("bad max_output_tokens", [resp_line("a", body={"max_output_tokens": 0})],
     "invalid_max_tokens", "body.max_output_tokens"),
    ("chat url in a responses batch", [{"custom_id": "a", "method": "POST",
                                        "url": "/v1/chat/completions", "body": {}}],
     "url_mismatch", "url"),
    ("depends_on", [resp_line("a"), resp_line("b", "{{a}}", depends_on=["a"])],
     "unsupported_dependency", "depends_on"),
]


@pytest.mark.parametrize("name,lines,code,param", RULES, ids=[r[0] for r in RULES])
async def test_responses_rules(cfg, name, lines, code, param):
    async with running(cfg) as srv:
        client = srv.client()
        b, done = await _run(client, lines)
        assert done.status == "failed", done
        first = done.errors.data[0]
        assert (first.code, first.param) == (code, param), done.errors
        assert b.id not in srv.executor.submitted


async def test_responses_prompt_near_the_context_is_refused(cfg, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl([resp_line("a", "word " * 2000)]))  # ~2,500 tokens at 4 chars each
    res = validate_file(path, RESPONSES, cfg, TokenCounter(cfg))
    assert [(e["code"], e["param"]) for e in res.errors] == [("context_length_exceeded",
                                                              "body.max_output_tokens")]
