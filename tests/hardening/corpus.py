"""The hostile / broken input corpus: data only, asserted by `test_corpus.py`.

Three tables:
- `UPLOADS`: raw `POST /v1/files` requests -> (HTTP status, error code, error param).
- `CREATES`: raw `POST /v1/batches` bodies -> (HTTP status, error code, error param).
- `LINES`: batch input files -> the batch fails with errors.data[0] = (code, line), or is accepted
  (code None) and every request reaches the executor with its body forwarded as is.

Decisions the corpus pins down (each matches vLLM's OpenAI server or OpenAI's Batch API):
- unknown body fields, `n` > 1 and an out-of-range `temperature` are passed to the engine untouched:
  vLLM's request models are `extra="allow"` (it logs and ignores unknown fields) and it is the engine
  that judges sampling parameters (a bad one becomes that request's 400 line in the error file);
- NaN / Infinity are not JSON (RFC 8259): the line is `invalid_json_line`;
- model names are case-sensitive, as in OpenAI and vLLM: `TINY-A` is `model_not_found`;
- a UTF-8 BOM and CRLF line endings are accepted;
- message content and prompts have OpenAI's shapes (a text part's `text` is a string, a prompt is at
  most a list of lists of token ids): anything else is `invalid_messages` / `invalid_prompt`;
- a line over `[limits].max_line_bytes` is `line_too_long`, and is never read whole.
"""

from __future__ import annotations

import json
from typing import Any

CHAT = "/v1/chat/completions"
BOUNDARY = "hardening-boundary-7f3a"


def chat(cid: Any, model: str = "tiny-a", text: Any = "hello", **body: Any) -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": CHAT,
            "body": {"model": model, "messages": [{"role": "user", "content": text}],
                     "max_tokens": 8, **body}}


def jsonl(lines: list[Any], sep: bytes = b"\n") -> bytes:
    out = [ln if isinstance(ln, bytes) else ln.encode() if isinstance(ln, str)
           else json.dumps(ln).encode() for ln in lines]
    return sep.join(out) + sep


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = BOUNDARY,
              close: bool = True) -> bytes:
    """A hand-built multipart/form-data body: (field name, filename or None, content)."""
    out = b""
    for name, filename, content in parts:
        disp = f'form-data; name="{name}"'
        if filename is not None:
            quoted = filename.replace("\\", "\\\\").replace('"', '\\"')  # quoted-string
            disp += f'; filename="{quoted}"'
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + content + b"\r\n"
    if close:
        out += f"--{boundary}--\r\n".encode()
    return out


MP = f"multipart/form-data; boundary={BOUNDARY}"
MAX_FILE_BYTES = 16 * 1024 * 1024  # the corpus server's [limits].max_file_bytes
MAX_LINE_BYTES = 11 * 1024 * 1024  # and its max_line_bytes: huge_single_line_10mb is under it
GOOD_FILE = jsonl([chat("a")])

# (name, content type, body, status, error code, error param)
UPLOADS: list[tuple[str, str, bytes, int, str | None, str | None]] = [
    ("json_body_not_multipart", "application/json", b'{"purpose": "batch"}', 415,
     "unsupported_media_type", None),
    ("multipart_without_boundary", "multipart/form-data", multipart([]), 400, None, None),
    ("multipart_bad_part_header", MP,
     f"--{BOUNDARY}\r\n\x7fgarbage\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode(), 400, None, None),
    ("multipart_truncated", MP,
     multipart([("purpose", None, b"batch"), ("file", "a.jsonl", GOOD_FILE)], close=False)[:-40],
     400, None, None),
    ("multipart_no_parts", MP, f"--{BOUNDARY}--\r\n".encode(), 400, "missing_required_parameter",
     "file"),
    ("missing_file", MP, multipart([("purpose", None, b"batch")]), 400,
     "missing_required_parameter", "file"),
    ("missing_purpose", MP, multipart([("file", "a.jsonl", GOOD_FILE)]), 400,
     "missing_required_parameter", "purpose"),
    ("unknown_purpose", MP, multipart([("purpose", None, b"batches"),
                                       ("file", "a.jsonl", GOOD_FILE)]), 400, "invalid_purpose",
     "purpose"),
    ("huge_purpose_field", MP, multipart([("purpose", None, b"b" * 100_000),
                                          ("file", "a.jsonl", GOOD_FILE)]), 400,
     "invalid_purpose", "purpose"),
    ("empty_file", MP, multipart([("purpose", None, b"batch"), ("file", "a.jsonl", b"")]), 400,
     "empty_file", "file"),
    ("not_utf8", MP, multipart([("purpose", None, b"batch"),
                                ("file", "a.jsonl", b'{"custom_id": "\xff\xfe"}\n')]), 400,
     "invalid_encoding", "file"),
    ("latin1_text", MP, multipart([("purpose", None, b"batch"),
                                   ("file", "a.jsonl", "caf\u00e9\n".encode("latin-1"))]), 400,
     "invalid_encoding", "file"),
    ("over_size_limit", MP, multipart([("purpose", None, b"batch"),
                                       ("file", "a.jsonl", b"x" * (MAX_FILE_BYTES + 1))]), 413,
     "file_too_large", "file"),
    ("filename_not_utf8", MP, multipart([("purpose", None, b"batch"), ("file", "caf?.jsonl",
                                                                      GOOD_FILE)]).replace(
        b"caf?", b"caf\xe9"), 400, "invalid_filename", "file"),
    ("two_file_parts", MP, multipart([("purpose", None, b"batch"), ("file", "a.jsonl", GOOD_FILE),
                                      ("file", "b.jsonl", GOOD_FILE)]), 400, "too_many_files",
     "file"),
]

DEEP = 100_000  # nesting depth of the deeply nested documents

# (name, raw body, status, error code, error param); input_file_id "{file}" is replaced by a real id
CREATES: list[tuple[str, bytes, int, str | None, str | None]] = [
    ("body_not_json", b"{not json", 400, None, None),
    ("body_json_array", b"[]", 400, None, None),
    ("body_not_utf8", b'{"input_file_id": "\xff"}', 400, None, None),
    ("body_deeply_nested", b"[" * DEEP + b"]" * DEEP, 400, None, None),
    ("body_deeply_nested_metadata",
     b'{"input_file_id": "{file}", "endpoint": "/v1/chat/completions", "completion_window": '
     b'"24h", "metadata": ' + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b"}", 400, None, None),
    ("body_over_1mb", b'{"x": "' + b"a" * (1 << 20) + b'"}', 413, None, None),
    ("missing_input_file_id", b'{"endpoint": "/v1/chat/completions", "completion_window": "24h"}',
     400, "missing_required_parameter", "input_file_id"),
    ("numeric_input_file_id",
     b'{"input_file_id": 7, "endpoint": "/v1/chat/completions", "completion_window": "24h"}',
     400, None, "input_file_id"),
    ("bad_completion_window",
     b'{"input_file_id": "{file}", "endpoint": "/v1/chat/completions", "completion_window": "7d"}',
     400, "invalid_completion_window", "completion_window"),
    ("nan_in_metadata",
     b'{"input_file_id": "{file}", "endpoint": "/v1/chat/completions", "completion_window": '
     b'"24h", "metadata": {"a": NaN}}', 400, None, "metadata"),
    ("metadata_17_keys", json.dumps(
        {"input_file_id": "{file}", "endpoint": CHAT, "completion_window": "24h",
         "metadata": {f"k{i}": "v" for i in range(17)}}).encode(), 400, None, "metadata"),
    ("metadata_long_key", json.dumps(
        {"input_file_id": "{file}", "endpoint": CHAT, "completion_window": "24h",
         "metadata": {"k" * 65: "v"}}).encode(), 400, None, "metadata"),
    ("metadata_long_value", json.dumps(
        {"input_file_id": "{file}", "endpoint": CHAT, "completion_window": "24h",
         "metadata": {"k": "v" * 513}}).encode(), 400, None, "metadata"),
    ("metadata_not_object", json.dumps(
        {"input_file_id": "{file}", "endpoint": CHAT, "completion_window": "24h",
         "metadata": ["a"]}).encode(), 400, None, "metadata"),
    ("unknown_input_file", json.dumps(
        {"input_file_id": "file-doesnotexist", "endpoint": CHAT,
         "completion_window": "24h"}).encode(), 404, "not_found", "id"),
    ("path_traversal_file_id", json.dumps(
        {"input_file_id": "../samullm.db", "endpoint": CHAT,
         "completion_window": "24h"}).encode(), 404, "not_found", "id"),
]

DEEP_LINE = b'{"custom_id": "deep", "method": "POST", "url": "/v1/chat/completions", "body": ' + \
    b"[" * DEEP + b"]" * DEEP + b"}"

# (name, file bytes, failing code or None when accepted, line, param)
LINES: list[tuple[str, bytes, str | None, int | None, str | None]] = [
    ("only_blank_lines", b"\n\n   \n\t\n\r\n", "empty_file", None, None),
    ("invalid_json_line", jsonl([chat("a"), "{oops"]), "invalid_json_line", 2, None),
    ("nan_literal", jsonl([chat("a"), json.dumps(chat("b")).replace('"max_tokens": 8',
                                                                   '"temperature": NaN')]),
     "invalid_json_line", 2, None),
    ("infinity_literal", jsonl([json.dumps(chat("a")).replace('"max_tokens": 8',
                                                             '"max_tokens": Infinity')]),
     "invalid_json_line", 1, None),
    ("deeply_nested_line", jsonl([chat("a"), chat("b"), DEEP_LINE]), "invalid_json_line", 3, None),
    ("line_is_array", jsonl([chat("a"), "[1, 2]"]), "invalid_request", 2, None),
    ("numeric_custom_id", jsonl([chat("a"), chat(12345)]), "invalid_custom_id", 2, "custom_id"),
    ("null_custom_id", jsonl([chat(None)]), "missing_custom_id", 1, "custom_id"),
    ("empty_custom_id", jsonl([chat("")]), "invalid_custom_id", 1, "custom_id"),
    ("duplicate_custom_id", jsonl([chat("a"), chat("b"), chat("a")]), "duplicate_custom_id", 3,
     "custom_id"),
    ("max_tokens_zero", jsonl([chat("a", max_tokens=0)]), "invalid_max_tokens", 1,
     "body.max_tokens"),
    ("max_tokens_negative", jsonl([chat("a"), chat("b", max_tokens=-5)]), "invalid_max_tokens", 2,
     "body.max_tokens"),
    ("max_tokens_1e9", jsonl([chat("a", max_tokens=10**9)]), "context_length_exceeded", 1,
     "body.max_tokens"),
    ("max_tokens_string", jsonl([chat("a", max_tokens="8")]), "invalid_max_tokens", 1,
     "body.max_tokens"),
    ("max_tokens_bool", jsonl([chat("a", max_tokens=True)]), "invalid_max_tokens", 1,
     "body.max_tokens"),
    ("model_case_differs", jsonl([chat("a"), chat("b", model="TINY-A")]), "model_not_found", 2,
     "body.model"),
    ("model_not_string", jsonl([chat("a", model=["tiny-a"])]), "model_not_found", 1, "body.model"),
    ("method_get", jsonl([{**chat("a"), "method": "GET"}]), "invalid_method", 1, "method"),
    ("url_mismatch", jsonl([{**chat("a"), "url": "/v1/completions"}]), "url_mismatch", 1, "url"),
    ("body_null", jsonl([{**chat("a"), "body": None}]), "invalid_body", 1, "body"),
    ("stream_true", jsonl([chat("a", stream=True)]), "stream_unsupported", 1, "body.stream"),
    ("messages_empty", jsonl([{**chat("a"), "body": {"model": "tiny-a", "messages": []}}]),
     "invalid_messages", 1, "body.messages"),
    ("huge_single_line_10mb", jsonl([chat("a"), chat("big", text="x" * (10 * 1024 * 1024))]),
     "context_length_exceeded", 2, "body.max_tokens"),
    ("line_over_max_line_bytes", jsonl([chat("a"), chat("big", text="x" * (12 * 1024 * 1024)),
                                        chat("c")]), "line_too_long", 2, None),
    ("text_part_number", jsonl([chat("a"), chat("b", text=[{"type": "text", "text": 5}])]),
     "invalid_messages", 2, "body.messages[0].content[0].text"),
    ("text_part_null", jsonl([chat("a", text=[{"type": "text", "text": None}])]),
     "invalid_messages", 1, "body.messages[0].content[0].text"),
    ("content_number", jsonl([chat("a", text=5)]), "invalid_messages", 1,
     "body.messages[0].content"),
    ("content_nested_900", jsonl([json.dumps(chat("a", text="@")).replace(
        '"@"', "[" * 900 + "]" * 900)]), "invalid_messages", 1, "body.messages[0].content[0]"),
    ("lines_50001", jsonl([chat(f"r{i}", max_tokens=1) for i in range(50_001)]), "too_many_tasks",
     50_001, None),
    # accepted
    ("bom_and_crlf", b"\xef\xbb\xbf" + jsonl([chat("a"), chat("b")], sep=b"\r\n"), None, None, None),
    ("custom_id_10000_chars", jsonl([chat("c" * 10_000), chat("d")]), None, None, None),
    ("unicode_everywhere", jsonl([chat("\u00e9t\u00e9-\U0001f600", text="\u4f60\u597d \u202e")]),
     None, None, None),
    ("unknown_body_fields", jsonl([chat("a", frobnicate={"x": 1}, top_k=3)]), None, None, None),
    ("n_greater_than_1", jsonl([chat("a", n=3)]), None, None, None),
    ("temperature_out_of_range", jsonl([chat("a", temperature=7.5), chat("b", temperature=-1)]),
     None, None, None),
    ("unknown_top_level_fields", jsonl([{**chat("a"), "extra": [1, 2]}]), None, None, None),
    ("content_parts_and_null", jsonl([chat("a", text=[{"type": "text", "text": "hi"},
                                                      {"type": "image_url",
                                                       "image_url": {"url": "data:,"}}]),
                                      {**chat("b"), "body": {"model": "tiny-a", "messages": [
                                          {"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": None}]}}]),
     None, None, None),
]
