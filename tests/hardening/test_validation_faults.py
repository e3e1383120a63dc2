"""Validator faults, without a server: inputs that made the per-line checker raise (the batch then
sat in `validating`), a line too long to hold in memory, and a fuzz of body shapes. Each must end as
a line error `{code, message, param, line}`, never as an exception out of `validate_file`."""

from __future__ import annotations

import json
import random
import re
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

import gateway.lines as line_format
import gateway.validation as validation
from gateway.tokens import TokenCounter
from runtime.config import ConfigError, LimitsConfig, parse_config

from ..conftest import TEST_MODELS, ensure_test_model
from ..gateway.conftest import chat_line, plan_only_config

CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
MODEL = {CHAT: "tiny-a", COMPLETIONS: "tiny-a", EMBEDDINGS: "embedder"}
FIELD = {CHAT: "messages", COMPLETIONS: "prompt", EMBEDDINGS: "input"}


def _line(cid: str, endpoint: str, value: Any, **body: Any) -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": endpoint,
            "body": {"model": MODEL[endpoint], FIELD[endpoint]: value, **body}}


def _validate(tmp_path: Path, lines: list[Any], endpoint: str = CHAT,
              **limits: Any) -> validation.ValidationResult:
    cfg = plan_only_config(tmp_path / "state", **limits)
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(_dumps(ln) + b"\n" for ln in lines))
    return validation.validate_file(path, endpoint, cfg, TokenCounter(cfg))


def _errors(res: validation.ValidationResult) -> list[tuple[str, int | None, str | None]]:
    assert all(e["message"] for e in res.errors)
    return [(e["code"], e["line"], e["param"]) for e in res.errors]


def _nested(depth: int) -> str:
    """A stand-in for a list nested `depth` levels deep, spliced in by `_dumps`: json.dumps recurses
    once a level and would hit the recursion limit itself."""
    return f"\x00nested{depth}\x00"


def _dumps(line: Any) -> bytes:
    return re.sub(r'"\\u0000nested(\d+)\\u0000"', lambda m: "[" * int(m[1]) + "]" * int(m[1]),
                  json.dumps(line)).encode()


BAD_CONTENT = [  # (content of the second message, param)
    ([{"type": "text", "text": 5}], "content[0].text"),
    ([{"type": "text", "text": None}], "content[0].text"),
    ([{"type": "text"}], "content[0].text"),
    ([{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": ["a"]}],
     "content[1].text"),
    ([{"text": "no type"}], "content[0].type"),
    ([{"type": 3, "text": "a"}], "content[0].type"),
    (["a bare string"], "content[0]"),
    (5, "content"),
    ({"type": "text", "text": "an object, not a list"}, "content"),
    (_nested(900), "content[0]"),
]


@pytest.mark.parametrize("content,param", BAD_CONTENT, ids=[repr(c)[:40] for c, _ in BAD_CONTENT])
def test_a_bad_content_shape_is_a_line_error(tmp_path, content, param):
    """`{"type": "text", "text": 5}` raised TypeError out of the token estimate."""
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": content}]
    res = _validate(tmp_path, [chat_line("a"), _line("b", CHAT, msgs), chat_line("c")])
    assert _errors(res) == [("invalid_messages", 2, f"body.messages[1].{param}")]
    assert [it.line for it in res.items] == [1, 3]


def test_content_shapes_openai_accepts(tmp_path):
    """null content (an assistant turn with tool calls), text parts and parts without text."""
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a" * 40},
                                         {"type": "image_url", "image_url": {"url": "data:x"}},
                                         {"type": "text", "text": "b" * 39}]},
            {"role": "assistant", "content": None, "tool_calls": []}]
    res = _validate(tmp_path, [_line("a", CHAT, msgs)])
    assert res.ok, res.errors
    assert res.items[0].prompt_tokens == 2 * 4 + 21  # text parts and a separator each, / 4


BAD_PROMPTS = [  # (prompt, param suffix)
    (_nested(900), "[0]"),  # RecursionError in the estimate
    ([[[1]]], "[0]"),
    ([[1, "a"]], "[0]"),
    (["a", 1], ""),
    ([1.5], ""),
    ([True, 2], ""),
    ([None], ""),
    (5, ""),
    ({"text": "a"}, ""),
]


@pytest.mark.parametrize("endpoint", [COMPLETIONS, EMBEDDINGS])
@pytest.mark.parametrize("prompt,suffix", BAD_PROMPTS, ids=[repr(p)[:30] for p, _ in BAD_PROMPTS])
def test_a_bad_prompt_shape_is_a_line_error(tmp_path, endpoint, prompt, suffix):
    need = FIELD[endpoint]
    lines = [_line("a", endpoint, "ok"), _line("b", endpoint, prompt), _line("c", endpoint, [1, 2])]
    res = _validate(tmp_path, lines, endpoint)
    assert _errors(res) == [(f"invalid_{need}", 2, f"body.{need}{suffix}")]
    assert [it.line for it in res.items] == [1, 3]


@pytest.mark.parametrize("prompt,tokens", [("abcdefgh", 2), (["abcd", "abcdefgh"], 3),
                                           ([5, 6, 7], 3), ([[5, 6], [7]], 3), ([], 0)])
def test_prompt_shapes_openai_accepts(tmp_path, prompt, tokens):
    """A string, strings, token ids, or lists of token ids (counted as ids, not characters)."""
    res = _validate(tmp_path, [_line("a", COMPLETIONS, prompt)], COMPLETIONS)
    assert res.ok, res.errors
    assert res.items[0].prompt_tokens == tokens


def test_an_unexpected_checker_exception_is_a_line_error(tmp_path, monkeypatch):
    """A bug in a rule fails its line with a message naming it, not the whole validation."""
    def broken(self, model, endpoint, body):
        if body["prompt"] == "boom":
            raise ValueError("a checker bug")
        return 1

    monkeypatch.setattr(TokenCounter, "estimate_body", broken)
    lines = [_line("a", COMPLETIONS, "ok"), _line("b", COMPLETIONS, "boom"),
             _line("a", COMPLETIONS, "ok")]
    res = _validate(tmp_path, lines, COMPLETIONS)
    assert _errors(res) == [("invalid_request", 2, None), ("duplicate_custom_id", 3, "custom_id")]
    assert "ValueError" in res.errors[0]["message"]


# --- fuzz: random types and nesting in every field the checker reads ---------------------------

def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(12 if depth < 4 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 7, 2**63 - 1, -2**63, 10**9])
    if kind == 3:
        return rng.choice([0.0, -1.5, 1e308, 3.25])
    if kind in (4, 5, 6):
        n = rng.choice([0, 1, 5, 300, 3000])
        return "".join(rng.choice("ab \u00e9\u4f60\U0001f600\n\"\\\u2028") for _ in range(n))
    if kind in (7, 8):
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 9:
        return {rng.choice(["type", "text", "content", "role", "x"]): _random_value(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    if kind == 10:
        return _nested(rng.choice([2, 3, 50, 1000]))  # orjson parses up to 1024 levels
    part = {"type": rng.choice(["text", "image_url", "input_audio", 1, None])}
    if rng.random() < 0.8:
        part["text"] = _random_value(rng, depth + 1)
    return [part]


def _mutated(rng: random.Random, endpoint: str, i: int) -> Any:
    """A valid line with a few of its fields (or its whole self) replaced by random values."""
    text = "w " * rng.choice([1, 10, 700, 1500])  # near the 1024-token context: counted exactly
    value: Any = ([{"role": "user", "content": text}] if endpoint == CHAT
                  else rng.choice([text, [text, "x"], [1, 2, 3], [[1], [2, 3]]]))
    line = _line(f"c{i}", endpoint, value, max_tokens=rng.choice([1, 8, 900]))
    spots: list[tuple[dict[str, Any], str]] = [(line, k) for k in ("custom_id", "method", "url",
                                                                   "body")]
    body = line["body"]
    spots += [(body, k) for k in ("model", "max_tokens", "max_completion_tokens", "stream")]
    spots += [(body, FIELD[endpoint])] * 4  # the shapes under test, more often
    if endpoint == CHAT:
        spots += [(body["messages"][0], "content")] * 6 + [(body["messages"][0], "role")]
    for _ in range(rng.randint(1, 3)):
        where, key = rng.choice(spots)
        where[key] = _random_value(rng)
    return line if rng.random() < 0.97 else _random_value(rng)


@pytest.mark.parametrize("endpoint", [CHAT, COMPLETIONS, EMBEDDINGS])
def test_fuzzed_lines_never_raise(tmp_path, monkeypatch, endpoint):
    """1,500 lines per endpoint, a real tokenizer (so exact counts run): every line is either an
    item or an error, with a short message (values are not echoed whole)."""
    model_dir = ensure_test_model("tiny-a", TEST_MODELS["tiny-a"])
    cfg = parse_config({
        "server": {"state_dir": str(tmp_path / "state")},
        "limits": {"max_requests_per_batch": 10_000},
        "models": [{"name": "tiny-a", "path": str(model_dir), "max_model_len": 1024},
                   {"name": "embedder", "path": str(model_dir), "max_model_len": 512,
                    "engine_args": {"runner": "pooling", "convert": "embed"}}]})
    rng = random.Random(f"fuzz {endpoint}")
    lines = [_dumps(_mutated(rng, endpoint, i)) for i in range(1500)]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    monkeypatch.setattr(validation, "MAX_REPORTED_ERRORS", len(lines))
    res = validation.validate_file(path, endpoint, cfg, TokenCounter(cfg))
    assert len(res.items) + res.error_count == len(lines)
    assert not [e for e in res.errors if e["code"] == "invalid_request" and "validated" in
                e["message"]], "a rule raised (caught by the catch-all)"
    assert max(len(e["message"]) for e in res.errors) < 500
    assert len(res.items) > 50 and res.error_count > 500  # the fuzz reaches both outcomes


# --- [limits].max_line_bytes -------------------------------------------------------------------

@pytest.mark.parametrize("block", [64, 1000, 8 << 20])
@pytest.mark.parametrize("last", [False, True], ids=["middle", "last_no_newline"])
def test_a_line_over_max_line_bytes_is_one_error(tmp_path, monkeypatch, block, last):
    """The long line is skipped, not held; the lines around it keep their numbers and offsets."""
    monkeypatch.setattr(line_format, "READ_BYTES", block)
    good = [json.dumps(chat_line(f"g{i}", text="t" * i)).encode() for i in range(4)]
    long = json.dumps(chat_line("long", text="x" * 900)).encode()  # 3x the limit
    rows = [good[0], long, good[1], b"", good[2]] + ([] if not last else [long])
    data = b"\r\n".join(rows) + (b"" if last else b"\n" + good[3] + b"\n")
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    cfg = plan_only_config(tmp_path / "state", max_line_bytes=300)
    res = validation.validate_file(path, CHAT, cfg, TokenCounter(cfg))
    expect = [("line_too_long", 2, None)] + ([("line_too_long", 6, None)] if last else [])
    assert _errors(res) == expect
    assert [it.line for it in res.items] == [1, 3, 5] + ([] if last else [6])
    for it in res.items:
        assert it.ref is not None
        raw = data[it.ref.offset:it.ref.offset + it.ref.length]
        assert json.loads(raw)["custom_id"] == it.custom_id


def test_a_line_at_max_line_bytes_is_accepted(tmp_path, monkeypatch):
    monkeypatch.setattr(line_format, "READ_BYTES", 64)
    line = json.dumps(chat_line("a", text="x" * 200)).encode()
    path = tmp_path / "in.jsonl"
    path.write_bytes(line + b"\n")
    cfg = plan_only_config(tmp_path / "state", max_line_bytes=len(line))
    assert validation.validate_file(path, CHAT, cfg, TokenCounter(cfg)).ok


def test_one_huge_line_does_not_grow_memory(tmp_path):
    """A 190 MB line took the gateway to 981 MB: every piece of it was kept, joined, then parsed.
    Now a 60 MB line costs the read buffer plus at most max_line_bytes (default limits)."""
    size = 60 << 20
    cfg = plan_only_config(tmp_path / "state")
    path = tmp_path / "in.jsonl"
    with open(path, "wb") as f:
        f.write(json.dumps(chat_line("a")).encode() + b"\n")
        f.write(json.dumps(chat_line("big", text="x" * size)).encode() + b"\n")
        f.write(json.dumps(chat_line("b")).encode() + b"\n")
    tokens = TokenCounter(cfg)
    tracemalloc.start()
    try:
        res = validation.validate_file(path, CHAT, cfg, tokens)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert _errors(res) == [("line_too_long", 2, None)]
    assert [it.line for it in res.items] == [1, 3]
    limit = LimitsConfig().max_line_bytes
    assert peak < line_format.READ_BYTES + 1.3 * limit < size / 2, peak


@pytest.mark.parametrize("value", [0, -1])
def test_max_line_bytes_must_be_positive(tmp_path, value):
    with pytest.raises(ConfigError, match="max_line_bytes: must be positive"):
        plan_only_config(tmp_path, max_line_bytes=value)
