"""Building a batch's output and error files from its journal.

Lines follow input order. Successful requests (HTTP 200) go to the output file; the error file gets
HTTP failures (with the engine's response), non-HTTP failures (`error`), and one line per request that
never ran (`batch_expired`, `batch_cancelled`). Every custom_id of the input lands in exactly one of the
two files. File ids derive from the batch id, so finalizing twice (after a crash) rewrites the same
files instead of leaking new ones. Runs in a worker thread; the caller commits the metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.filestore import FileStore
from gateway.ids import derived_id
from gateway.lines import Requests
from runtime.executor_api import Outcome
from runtime.usage import usage_of

UNFINISHED = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was cancelled before it was executed.",
    "batch_incomplete": "This request did not run to completion.",
    "batch_failed": "This request was not run: the batch failed (see the batch's `errors`).",
}


@dataclass
class Counts:
    """Live `request_counts`, per model too, and token usage, all derived from outcomes."""

    total: int = 0
    completed: int = 0
    failed: int = 0
    per_model: dict[str, dict[str, int]] = field(default_factory=dict)
    input_tokens: int = 0
    output_tokens: int = 0

    @classmethod
    def of_totals(cls, model_totals: dict[str, int]) -> "Counts":
        c = cls(total=sum(model_totals.values()))
        c.per_model = {m: {"total": n, "completed": 0, "failed": 0}
                       for m, n in sorted(model_totals.items())}
        return c

    def add(self, o: Outcome) -> None:
        key = "completed" if o.ok else "failed"
        setattr(self, key, getattr(self, key) + 1)
        pm = self.per_model.setdefault(o.model, {"total": 0, "completed": 0, "failed": 0})
        pm[key] += 1
        usage = usage_of(o.response_body)
        self.input_tokens += usage.prompt or 0
        self.output_tokens += usage.output or 0

    def request_counts(self) -> dict[str, int]:
        return {"total": self.total, "completed": self.completed, "failed": self.failed}

    def usage(self) -> dict[str, Any]:
        return {"input_tokens": self.input_tokens, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": self.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.input_tokens + self.output_tokens}


@dataclass
class FinalFiles:
    output_file_id: str | None
    output_bytes: int
    error_file_id: str | None
    error_bytes: int
    output_lines: int
    error_lines: int
    # over the batch's requests (a journal record of another custom_id counts for none)
    counts: Counts = field(default_factory=Counts)


def journaled_requests(outcomes: list[Outcome]) -> Requests:
    """The requests of a batch whose input file is gone, as far as its journal knows them: the
    ones that finished, in input order (the others cannot be named any more)."""
    for o in sorted(outcomes, key=lambda o: o.line):
        yield o.line, o.custom_id, o.model


def _count(counts: Counts, model: str, o: Outcome | None) -> None:
    """Add one request of the batch (and its outcome, if any) to `counts`."""
    counts.total += 1
    pm = counts.per_model.setdefault(model, {"total": 0, "completed": 0, "failed": 0})
    pm["total"] += 1
    if o is not None:
        counts.add(o)


# Characters that JSON leaves raw inside strings but that str.splitlines() (and some JSONL readers)
# take for line ends: generated text may hold them, and `client.files.content(id).text.splitlines()`
# would cut such a line in two. Their UTF-8 bytes cannot occur in any other character, so replacing
# them with the JSON escape is exact.
_LINE_BREAKERS = ((b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"),
                  (b"\xc2\x85", b"\\u0085"))


def jsonl_line(rec: dict) -> bytes:
    """One output/error file line: JSON with no character any common reader splits lines on."""
    out = orjson.dumps(rec)
    for raw, escaped in _LINE_BREAKERS:
        if raw in out:
            out = out.replace(raw, escaped)
    return out + b"\n"


def result_line(batch_id: str, line: int, custom_id: str, o: Outcome | None,
                unfinished_code: str) -> tuple[bool, bytes]:
    """(goes to the output file?, the JSONL line)."""
    rid = derived_id("batch_req_", batch_id, line)
    if o is None:
        rec = {"id": rid, "custom_id": custom_id, "response": None,
               "error": {"code": unfinished_code, "message": UNFINISHED[unfinished_code]}}
        return False, jsonl_line(rec)
    request_id = o.request_id or derived_id("req_", batch_id, line)
    # An HTTP answer (any status) keeps its response, as OpenAI does; `error` is for failures
    # without one (engine gone for good). The executor may carry a 4xx body in `extra["body"]`.
    body = o.response_body if o.response_body is not None else o.extra.get("body")
    if o.status_code is not None and body is not None:
        if o.status_code != 200:
            body = openai_error(body, o.status_code)
        response = {"status_code": o.status_code, "request_id": request_id, "body": body}
        rec = {"id": rid, "custom_id": custom_id, "response": response, "error": None}
    else:
        error = o.error
        if isinstance(error, dict) and not isinstance(error.get("code"), (str, type(None))):
            error = {**error, "code": str(error["code"])}
        rec = {"id": rid, "custom_id": custom_id, "response": None, "error": error}
    return o.ok, jsonl_line(rec)


def openai_error(body: Any, status: int) -> dict[str, Any]:
    """An engine's error answer in OpenAI's error object: `{"error": {message, type, param,
    code}}`. vLLM sends `{"error": {..., "code": 400}}` (older servers: the fields at the top
    level); its integer `code` is the HTTP status, already the line's `status_code`, and the spec's
    `code` is a string or null, so it becomes null (a string code is kept). The message is kept;
    `type` is OpenAI's for the status (vLLM's is its exception class, e.g. BadRequestError)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = body if isinstance(body, dict) else {"message": str(body)}
    code, param, message = err.get("code"), err.get("param"), err.get("message")
    return {"error": {
        "message": message if isinstance(message, str) else str(message or ""),
        "type": "invalid_request_error" if 400 <= status < 500 else "server_error",
        "param": param if isinstance(param, str) else None,
        "code": code if isinstance(code, str) and code else None}}


def write_result_files(store: FileStore, batch_id: str, requests: Requests,
                       outcomes: list[Outcome], unfinished_code: str) -> FinalFiles:
    """Both files and the final counts, in one pass over the requests."""
    by_id = {o.custom_id: o for o in outcomes}
    out_id = derived_id("file-", batch_id, "output")
    err_id = derived_id("file-", batch_id, "error")
    n_out = n_err = 0
    counts = Counts()
    with store.writer(out_id) as out, store.writer(err_id) as err:
        for line, cid, model in requests:
            o = by_id.get(cid)
            _count(counts, model, o)
            ok, data = result_line(batch_id, line, cid, o, unfinished_code)
            if ok:
                out.write(data)
                n_out += 1
            else:
                err.write(data)
                n_err += 1
    counts.per_model = dict(sorted(counts.per_model.items()))
    # An empty file is not published: OpenAI leaves the id null when there is nothing to report.
    if n_out == 0:
        store.delete(out_id)
    if n_err == 0:
        store.delete(err_id)
    return FinalFiles(out_id if n_out else None, out.size, err_id if n_err else None, err.size,
                      n_out, n_err, counts)
