"""Prompt-length estimates for planning: characters divided by the model's characters per token
(measured once with its own `tokenizer.json` when it has weights on disk, else 4). Validation
estimates every request (`estimate_body`) and counts exactly with the tokenizer only near the context
limit (`count_body(..., exact=True)`). Estimates only steer the planner and the context-length check;
the engine's `usage` is what gets reported."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any, Callable

from runtime.config import Config
from runtime.endpoints import RESPONSES

# the content parts of a Responses API input item that hold text
RESPONSE_TEXT_PARTS = frozenset(("input_text", "output_text", "text", "refusal"))
MESSAGE_OVERHEAD = 4  # role and separator tokens a chat template adds per message (typical)
EXACT_CHARS = 512  # longer texts are estimated (see TokenCounter.count_text)
CALIBRATION_TEXT = (  # ordinary prose and code: the model's characters per token are measured on it
    "The quick brown fox jumps over the lazy dog. In 1492, Columbus sailed the ocean blue; "
    "def main(args):\n    return sum(x * 2 for x in args if x > 0)\n"
    "Batch inference runs many requests offline, trading latency for throughput and cost. ") * 4


class TokenCounter:
    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self._cache: dict[str, Any] = {}
        self._ratio: dict[str, float] = {}
        self._lock = threading.Lock()  # validation runs in worker threads

    def _tokenizer(self, model: str) -> Any:
        with self._lock:
            if model not in self._cache:
                self._cache[model] = self._load(model)
            return self._cache[model]

    def _load(self, model: str) -> Any:
        m = self._cfg.model(model)
        path = m.resolved_path(self._cfg.base_dir) if m else None
        if path is None or not (Path(path) / "tokenizer.json").is_file():
            return None
        try:
            from tokenizers import Tokenizer
            return Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
        except Exception:  # an unreadable tokenizer degrades to the estimate, never fails a batch
            return None

    def count_text(self, model: str, text: str, exact: bool = False) -> int:
        """Tokens in `text`. Texts over EXACT_CHARS are estimated from the model's measured
        characters per token unless `exact`: BPE costs ~2 ms per KB on one core, which would cap
        validation near 1 MB/s; callers that reject on the count re-count exactly first."""
        tok = self._tokenizer(model)
        if tok is None:
            return (len(text) + 3) // 4
        if not exact and len(text) > EXACT_CHARS:
            return max(1, round(len(text) / self._chars_per_token(model, tok)))
        return len(tok.encode(text, add_special_tokens=False).ids)

    def _chars_per_token(self, model: str, tok: Any) -> float:
        with self._lock:
            if model not in self._ratio:
                n = len(tok.encode(CALIBRATION_TEXT, add_special_tokens=False).ids)
                self._ratio[model] = len(CALIBRATION_TEXT) / max(1, n)
            return self._ratio[model]

    def ratio(self, model: str) -> float:
        """The model's characters per token (4 without a tokenizer), measured once."""
        r = self._ratio.get(model)  # a plain dict read: no lock on the validation hot path
        if r is None:
            tok = self._tokenizer(model)
            r = 4.0 if tok is None else self._chars_per_token(model, tok)
            self._ratio[model] = r
        return r

    def estimate_body(self, model: str, endpoint: str, body: dict[str, Any]) -> int:
        """Prompt tokens of a request body from its characters and the model's characters per token:
        a few microseconds, where exact BPE costs about a millisecond per KB on this machine. Callers
        that reject on the count re-count exactly first (`count_body(..., exact=True)`)."""
        ratio = self.ratio(model)
        if endpoint == "/v1/chat/completions":
            msgs = body.get("messages") or []
            chars = 0
            for msg in msgs:
                chars += len(message_text(msg))
            return MESSAGE_OVERHEAD * len(msgs) + math.ceil(chars / ratio)
        if endpoint == RESPONSES:
            items, texts = response_texts(body)
            return MESSAGE_OVERHEAD * items + math.ceil(sum(map(len, texts)) / ratio)
        prompt = body.get("prompt" if endpoint == "/v1/completions" else "input")
        return _estimate_prompt(prompt, ratio)

    def count_body(self, model: str, endpoint: str, body: dict[str, Any],
                   exact: bool = False) -> int:
        if endpoint == "/v1/chat/completions":
            total = 0
            for msg in body.get("messages") or []:
                total += MESSAGE_OVERHEAD + self.count_text(model, message_text(msg), exact)
            return total
        if endpoint == RESPONSES:
            items, texts = response_texts(body)
            return MESSAGE_OVERHEAD * items + sum(self.count_text(model, t, exact) for t in texts)
        key = "prompt" if endpoint == "/v1/completions" else "input"
        return self._count_prompt(model, body.get(key), exact)

    def _count_prompt(self, model: str, prompt: Any, exact: bool = False) -> int:
        return _prompt_tokens(prompt, lambda text: self.count_text(model, text, exact))


def _estimate_prompt(prompt: Any, ratio: float) -> int:
    return _prompt_tokens(prompt, lambda text: math.ceil(len(text) / ratio))


def _prompt_tokens(prompt: Any, text_tokens: Callable[[str], int]) -> int:
    """Tokens of a completions prompt / embeddings input in the shapes OpenAI accepts: a string,
    strings, token ids, or lists of token ids. Two levels only, whatever the input holds: a prompt
    nested ~1,000 lists deep (JSON allows it) made a recursive walk raise RecursionError. Other
    shapes count 0 here; validation rejects them."""
    if isinstance(prompt, str):
        return text_tokens(prompt)
    if not isinstance(prompt, list):
        return 0
    total = 0
    for p in prompt:
        if isinstance(p, str):
            total += text_tokens(p)
        elif isinstance(p, list):
            total += len(p)  # token ids
        elif isinstance(p, int):
            total += 1
    return total


def message_text(msg: Any) -> str:
    if not isinstance(msg, dict):
        return ""
    content = msg.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text parts have tokens we can count
        # a non-string `text` (5, null) raised TypeError in the join; validation rejects it
        return " ".join(t for p in content if isinstance(p, dict)
                        and isinstance(t := p.get("text"), str))
    return ""


def response_texts(body: dict[str, Any]) -> tuple[int, list[str]]:
    """(input items, texts) of a Responses API body: `instructions`, and `input` as one string or
    a list of items (a message's `content` string or its text parts; a tool result's `output`
    string). Other shapes hold none here; validation rejects the malformed ones."""
    texts: list[str] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        texts.append(instructions)
    value = body.get("input")
    if isinstance(value, str):
        return 1 + bool(texts), [*texts, value]
    items = value if isinstance(value, list) else []
    for item in items:
        if not isinstance(item, dict):
            continue
        content = item.get("content", item.get("output"))
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [t for p in content if isinstance(p, dict) and p.get("type") in
                      RESPONSE_TEXT_PARTS and isinstance(t := p.get("text"), str)]
    return len(items) + bool(instructions), texts
