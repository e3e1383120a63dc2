"""Output/error file lines stay one line for every common reader, whatever the model generated."""

from __future__ import annotations

import json

from gateway.finalize import result_line
from runtime.executor_api import Outcome


def test_line_separators_in_generated_text_are_escaped() -> None:
    text = "a\u2028b\u2029c\x85d\x1ce\nf"  # what str.splitlines() would split on
    body = {"object": "chat.completion", "choices": [{"message": {"content": text}}]}
    o = Outcome(custom_id="c1", line=1, model="m", status_code=200, response_body=body)
    ok, line = result_line("batch_x", 1, "c1", o, "batch_incomplete")
    assert ok and line.endswith(b"\n")
    decoded = line.decode()
    assert len(decoded.splitlines()) == 1  # and the newline in the text is an escape too
    rec = json.loads(decoded)
    assert rec["response"]["body"]["choices"][0]["message"]["content"] == text
