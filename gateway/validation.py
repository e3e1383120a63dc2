"""Validation of a batch input file, streamed line by line (a 200 MB file is never held whole).

Every rule yields an error `{code, message, param, line}` with the 1-based line number; a file with any
error fails the whole batch (never a half-accepted batch). A clean file yields one `WorkItem` per
request, in input order, holding where its line lies rather than its body. Runs in a worker thread:
it is CPU work (JSON; the tokenizer only for prompts near the context limit).

`depends_on` (custom_ids whose generated text fills the line's placeholders: `runtime.placeholders`;
a repeat counts once) is checked per line, then for unknown ids, unlisted placeholders and cycles. A
prompt is measured without its placeholders: one filled in past the context fails only its request.
Each generating item gets the KV-block hashes of the prompt prefix it shares with other lines
(`WorkItem.prefix`, `gateway.prefixes`), for the planner to price vLLM's prefix cache.
"""

from __future__ import annotations

from math import ceil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from gateway.lines import OVERLONG, LineRef, iter_lines
from gateway.prefixes import PrefixIndex, prompt_text
from gateway.tokens import MESSAGE_OVERHEAD, RESPONSE_TEXT_PARTS, TokenCounter
from runtime.config import Config
from runtime.endpoints import ALL as SUPPORTED_ENDPOINTS
from runtime.endpoints import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, mismatch_message
from runtime.executor_api import WorkItem
from gateway.dependencies import dependency_errors, shown_id
from runtime.placeholders import placeholder_ids, template

DEPENDENT_ENDPOINTS = (CHAT, COMPLETIONS)  # lines that may take in generated text (depends_on)
MAX_REPORTED_ERRORS = 100  # errors.data keeps the first ones; `error_count` has them all


@dataclass
class ValidationResult:
    items: list[WorkItem] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    error_count: int = 0

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    @property
    def models(self) -> list[str]:
        return sorted({it.model for it in self.items})

    def add(self, code: str, message: str, line: int | None, param: str | None = None) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"code": code, "message": message, "param": param, "line": line})


class _LineError(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


# A prompt estimated within this fraction of the context is counted exactly before it is accepted or
# rejected (the characters-per-token estimate is off by a few tens of percent on unusual text).
NEAR_LIMIT = 0.5
# Past this many characters per token of context a prompt is over it without counting: BPE tokens
# of real vocabularies average 2-6 characters, a whole-word vocabulary ~10 (a prompt of such
# words was estimated at 4.4x its tokens from the prose-measured ratio, and refused unseen).
MAX_CHARS_PER_TOKEN = 16


def validate_file(path: Path, endpoint: str, cfg: Config, tokens: TokenCounter) -> ValidationResult:
    """Validate the input file at `path` (streamed in READ_BYTES blocks). Items refer to their line
    in `path` (`WorkItem.ref`): the file must stay in place while the batch lives."""
    res = ValidationResult()
    if endpoint not in SUPPORTED_ENDPOINTS:
        res.add("unsupported_endpoint", f"Endpoint {endpoint} is not supported; use one of "
                f"{', '.join(SUPPORTED_ENDPOINTS)}.", None, "endpoint")
        return res
    check = _LineChecker(str(path), endpoint, cfg, tokens)
    limit = cfg.limits.max_requests_per_batch
    requests = 0
    items = res.items
    loads, decode_error = orjson.loads, orjson.JSONDecodeError
    for lineno, offset, raw in iter_lines(path, cfg.limits.max_line_bytes):
        try:
            obj = loads(raw)
        except decode_error:
            if raw is OVERLONG:
                obj = _OVERLONG
            elif not bytes(raw).strip():
                continue  # blank lines are allowed and are not requests
            else:
                obj = _INVALID
        requests += 1
        if requests > limit:
            res.add("too_many_tasks", f"The file has more than {limit} requests; the limit per "
                    "batch is [limits].max_requests_per_batch.", lineno)
            return res
        try:
            items.append(check(obj, lineno, offset, len(raw)))
        except _LineError as err:
            res.add(err.code, err.message, lineno, err.param)
        except Exception as exc:  # a rule's own bug fails its line: raised, it left the batch
            res.add("invalid_request",  # `validating` for good
                    f"This line could not be validated: {type(exc).__name__}.", lineno)
    if requests == 0:
        res.add("empty_file", "The input file has no requests.", None)
    elif check.dependent:
        for line, code, message, param in dependency_errors(
                check.dependent, check.recheck, check.seen, check.endpoint, check.need):
            res.add(code, message, line, param)
    if res.ok:
        for item, prefix in check.prefixes.shared():
            item.prefix = prefix
    return res


_INVALID = object()  # a line that is not JSON
_OVERLONG = object()  # a line over [limits].max_line_bytes
_new_ref = tuple.__new__  # LineRef's generated __new__ costs ~0.8 us a call; this ~0.1 us


class _LineChecker:
    """The per-line rules; state shared across lines (seen custom_ids, model lookups)."""

    def __init__(self, path: str, endpoint: str, cfg: Config, tokens: TokenCounter) -> None:
        self.path, self.endpoint, self.cfg, self.tokens = path, endpoint, cfg, tokens
        self.need = {CHAT: "messages", COMPLETIONS: "prompt", EMBEDDINGS: "input",
                     RESPONSES: "input"}[endpoint]
        self.seen: set[str] = set()
        self.dependent: list[WorkItem] = []  # the items with depends_on, for the checks at the end
        self.recheck: list[WorkItem] = []  # of those, the ones with a placeholder of an unlisted id
        self.models: dict[str, Any] = {}
        self.ratios: dict[str, float] = {}
        # the generating items' KV-block hash chains: the shared parts are the items' `prefix`
        # once the whole file is read
        self.prefixes = PrefixIndex(self._text_again)

    def _model(self, name: Any) -> Any:
        if not isinstance(name, str):
            return None
        m = self.models.get(name)
        if m is None:
            m = self.models[name] = self.cfg.model(name)
        return m

    def _text_again(self, item: WorkItem) -> str | None:
        return prompt_text(item.body, self.endpoint, item.depends_on)

    def _ratio(self, model: str) -> float:
        r = self.ratios.get(model)
        if r is None:
            r = self.ratios[model] = self.tokens.ratio(model)
        return r

    def __call__(self, obj: Any, lineno: int, offset: int, length: int) -> WorkItem:
        if obj.__class__ is not dict:
            if obj is _INVALID:
                raise _LineError("invalid_json_line", "This line is not parseable as valid JSON.")
            if obj is _OVERLONG:
                raise _LineError("line_too_long", "The line is longer than "
                                 f"{self.cfg.limits.max_line_bytes} bytes, the limit per line "
                                 "([limits].max_line_bytes).")
            raise _LineError("invalid_request", "Each line must be a JSON object.")
        cid = obj.get("custom_id")
        if cid is None:
            raise _LineError("missing_custom_id", "The line has no `custom_id`.", "custom_id")
        if not isinstance(cid, str) or not cid:
            raise _LineError("invalid_custom_id", "`custom_id` must be a non-empty string.",
                             "custom_id")
        seen = self.seen
        if cid in seen:
            raise _LineError("duplicate_custom_id", f"The custom_id {_shown(cid)} appears more "
                             "than once; custom_ids must be unique within a batch.", "custom_id")
        seen.add(cid)
        if obj.get("method") != "POST":
            raise _LineError("invalid_method", "`method` must be \"POST\".", "method")
        endpoint = self.endpoint
        url = obj.get("url")
        if url != endpoint:
            raise _LineError("url_mismatch", f"The url {_shown(url)} does not match the batch "
                             f"endpoint {endpoint!r}.", "url")
        body = obj.get("body")
        if not isinstance(body, dict):
            raise _LineError("invalid_body", "`body` must be a JSON object.", "body")
        model_name = body.get("model")
        if model_name is None:
            raise _LineError("missing_model", "`body.model` is required.", "body.model")
        model = self._model(model_name)
        if model is None:
            names = ", ".join(m.name for m in self.cfg.models)
            raise _LineError("model_not_found", f"The model {_shown(model_name)} is not configured "
                             f"here (available: {names}).", "body.model")
        if endpoint not in (served := model.served_endpoints):
            raise _LineError("unsupported_endpoint", mismatch_message(model.name, endpoint, served),
                             "url")
        if body.get("stream"):
            raise _LineError("stream_unsupported", "`stream: true` is not supported in a batch.",
                             "body.stream")
        listed = obj.get("depends_on")
        deps = () if listed is None else self._depends_on(listed, cid)
        if deps:
            sent, body = body, template(body, endpoint, deps)  # measured without its placeholders
        need = self.need
        value = body.get(need)
        if value is None:
            raise _LineError(f"missing_{need}", f"`body.{need}` is required for {endpoint}.",
                             f"body.{need}")
        tokens = self.tokens
        if endpoint == CHAT:  # checked and estimated in one pass (the hot path of a big file)
            if value.__class__ is not list or not value:
                raise _LineError("invalid_messages", "`body.messages` must be a non-empty list of "
                                 "message objects.", "body.messages")
            chars = 0
            for msg in value:
                if msg.__class__ is not dict:
                    raise _LineError("invalid_messages", "`body.messages` must be a non-empty list "
                                     "of message objects.", "body.messages")
                content = msg.get("content")
                chars += len(content) if content.__class__ is str else _parts_chars(value, msg)
            prompt = MESSAGE_OVERHEAD * len(value) + ceil(chars / self._ratio(model.name))
        else:
            (_check_response_input if endpoint == RESPONSES else _check_prompt)(value, need)
            prompt = tokens.estimate_body(model.name, endpoint, body)
        max_tokens = _max_tokens(body, endpoint)
        ctx = model.max_model_len
        # an estimate near the limit never decides on its own: count exactly first (unless its
        # characters are over the context at any plausible characters-per-token ratio)
        if ctx <= prompt * (1 + NEAR_LIMIT) + (max_tokens or 0) \
                and prompt * self._ratio(model.name) <= ctx * MAX_CHARS_PER_TOKEN:
            prompt = tokens.count_body(model.name, endpoint, body, exact=True)
        ref = _new_ref(LineRef, (self.path, offset, length))
        if endpoint == EMBEDDINGS:
            if prompt > ctx:
                raise _LineError("context_length_exceeded", f"The input has about {prompt} tokens; "
                                 f"the model's context is {ctx}.", f"body.{need}")
            return WorkItem(lineno, cid, model.name, endpoint, None, prompt, 0, ref)
        if max_tokens is not None and prompt + max_tokens > ctx:
            raise _LineError("context_length_exceeded", f"max_tokens {max_tokens} plus the prompt "
                             f"(about {prompt} tokens) exceeds the model's context of {ctx} "
                             "tokens.", "body.max_output_tokens" if endpoint == RESPONSES
                             else "body.max_tokens")
        if prompt >= ctx:
            raise _LineError("context_length_exceeded", f"The prompt has about {prompt} tokens; "
                             f"the model's context is {ctx} tokens.", f"body.{need}")
        item = WorkItem(lineno, cid, model.name, endpoint, None, prompt,
                        max_tokens if max_tokens is not None else ctx - prompt, ref, deps)
        text = prompt_text(sent if deps else body, endpoint, deps)
        if text:
            self.prefixes.add(item, model.name, text, self._ratio(model.name))
        if deps:
            self.dependent.append(item)
            if any(x not in deps for x in placeholder_ids(sent, endpoint)):
                self.recheck.append(item)
        return item

    def _depends_on(self, listed: Any, cid: str) -> tuple[str, ...]:
        if listed.__class__ is not list:
            raise _wrong_type("invalid_depends_on", "depends_on", "an array of custom_ids", listed)
        if listed and self.endpoint == EMBEDDINGS:
            raise _LineError("embeddings_dependency", "An embeddings request generates no text and "
                             "takes in none: it cannot have `depends_on`.", "depends_on")
        if listed and self.endpoint not in DEPENDENT_ENDPOINTS:
            raise _LineError("unsupported_dependency", "`depends_on` is supported on "
                             f"{' and '.join(DEPENDENT_ENDPOINTS)} lines only.", "depends_on")
        for j, d in enumerate(listed):
            if d.__class__ is not str:
                raise _wrong_type("invalid_depends_on", f"depends_on[{j}]", "a string", d)
            if not d:
                raise _LineError("invalid_depends_on", f"`depends_on[{j}]` is an empty string.",
                                 f"depends_on[{j}]")
            if d == cid:
                raise _LineError("self_dependency", f"The request {_shown(cid)} lists itself in "
                                 "`depends_on`.", f"depends_on[{j}]")
        deps = tuple(dict.fromkeys(listed))  # a repeat names the same output: counted once
        if len(deps) > (limit := self.cfg.limits.max_dependencies):
            raise _LineError("too_many_dependencies", f"`depends_on` lists {len(deps)} requests; "
                             f"the limit is {limit} ([limits].max_dependencies).", "depends_on")
        return deps


# The shapes OpenAI accepts are checked, not trusted: the token estimate walks them, and a text
# part's `"text": 5` (TypeError) or a prompt nested 1,000 lists deep (RecursionError) raised out of
# it. Messages follow OpenAI's wording ("Invalid type for 'messages[0].content': ...").
_ABSENT = object()  # a required key that is not there
_JSON_TYPES = {str: "a string", int: "an integer", float: "a decimal", bool: "a boolean",
               list: "an array", dict: "an object", type(None): "null"}
_PROMPT_SHAPES = ("a string, an array of strings, an array of integers (token ids) or an array of "
                 "arrays of integers")


def _wrong_type(code: str, param: str, expected: str, value: Any) -> _LineError:
    if value is _ABSENT:
        return _LineError(code, f"Missing required parameter: '{param}'.", param)
    return _LineError(code, f"Invalid type for '{param}': expected {expected}, but got "
                      f"{_JSON_TYPES.get(value.__class__, 'a value')} instead.", param)


def _shown(value: Any) -> str:
    """A value for an error message: strings cut short (errors.data keeps up to 100 messages), other
    values by their JSON type (repr of a list 1,000 deep raises RecursionError)."""
    if value.__class__ is str:
        return shown_id(value)
    return f"({_JSON_TYPES.get(value.__class__, 'a value')})"


def _parts_chars(msgs: list[Any], msg: dict[str, Any]) -> int:
    """Countable characters of a message whose content is not a string: null (an assistant turn
    with tool calls) or content parts, objects with a string `type`, a text part's `text` a string.
    Other part types (image_url, ...) carry none."""
    content = msg.get("content")
    if content is None:
        return 0
    if content.__class__ is not list:
        raise _bad_content(msgs, msg, "", "a string, null or an array of content parts", content)
    chars = 0
    for j, part in enumerate(content):
        if part.__class__ is not dict:
            raise _bad_content(msgs, msg, f"[{j}]", "a content part object", part)
        kind = part.get("type", _ABSENT)
        if kind.__class__ is not str:
            raise _bad_content(msgs, msg, f"[{j}].type", "a string", kind)
        if kind == "text":
            text = part.get("text", _ABSENT)
            if text.__class__ is not str:
                raise _bad_content(msgs, msg, f"[{j}].text", "a string", text)
            chars += len(text) + 1  # a separator each, as message_text (the exact count) joins
    return chars


def _bad_content(msgs: list[Any], msg: dict[str, Any], where: str, expected: str,
                 value: Any) -> _LineError:
    i = next(i for i, m in enumerate(msgs) if m is msg)  # found only for an error: a scan
    return _wrong_type("invalid_messages", f"body.messages[{i}].content{where}", expected, value)


def _check_prompt(value: Any, need: str) -> None:
    """A completions `prompt` / embeddings `input` in one of _PROMPT_SHAPES, nothing deeper."""
    if value.__class__ is str:
        return
    code, param = f"invalid_{need}", f"body.{need}"
    if value.__class__ is not list:
        raise _wrong_type(code, param, _PROMPT_SHAPES, value)
    kinds = {v.__class__ for v in value}
    if kinds <= {str} or kinds <= {int}:  # bool is not a token id
        return
    if kinds != {list}:
        raise _LineError(code, f"Invalid type for '{param}': expected {_PROMPT_SHAPES}, but got an "
                         "array of other or mixed items instead.", param)
    for j, ids in enumerate(value):
        if not all(t.__class__ is int for t in ids):
            raise _LineError(code, f"Invalid type for '{param}[{j}]': expected an array of "
                             "integers (token ids).", f"{param}[{j}]")


def _check_response_input(value: Any, need: str) -> None:
    """A Responses API `input`: a string, or a non-empty list of input items (objects with a string
    `type` or a `role`), a `content` a string or parts whose text parts have a string `text`."""
    if value.__class__ is str:
        return
    if value.__class__ is not list or not value:
        raise _wrong_type("invalid_input", "body.input", "a string or a non-empty array of input "
                          "items", value if value.__class__ is not list else _ABSENT)
    for i, item in enumerate(value):
        if item.__class__ is not dict:
            raise _wrong_type("invalid_input", f"body.input[{i}]", "an input item object", item)
        kind = item.get("type", None if "role" in item else _ABSENT)
        if kind is not None and kind.__class__ is not str:
            raise _wrong_type("invalid_input", f"body.input[{i}].type", "a string", kind)
        content = item.get("content")
        parts = content if content.__class__ is list else ()
        if content is not None and content.__class__ not in (str, list):
            raise _wrong_type("invalid_input", f"body.input[{i}].content", "a string or an array "
                              "of content parts", content)
        for j, p in enumerate(parts):
            if p.__class__ is not dict or p.get("type").__class__ is not str or \
                    p["type"] in RESPONSE_TEXT_PARTS and p.get("text").__class__ is not str:
                raise _wrong_type("invalid_input", f"body.input[{i}].content[{j}]",
                                  "a content part with a string `type` (and `text`)", p)


def _max_tokens(body: dict[str, Any], endpoint: str) -> int | None:
    """The output cap the request asks for: chat prefers `max_completion_tokens`."""
    key, v = "max_tokens", None
    if endpoint == RESPONSES:
        key, v = "max_output_tokens", body.get("max_output_tokens")
        if v is None:
            return None
    elif endpoint == CHAT:
        key, v = "max_completion_tokens", body.get("max_completion_tokens")
    if v is None:
        key, v = "max_tokens", body.get("max_tokens")
        if v is None:
            return None
    if v.__class__ is not int or v < 1:  # bool is not int here
        raise _LineError("invalid_max_tokens", f"`body.{key}` must be a positive integer.",
                         f"body.{key}")
    return v
