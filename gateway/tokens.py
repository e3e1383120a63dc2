"""Prompt-length estimates for planning: the model's own `tokenizer.json` when it has weights on disk,
else characters / 4. Estimates only steer the planner and the context-length check; the engine's
`usage` is what gets reported."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from runtime.config import Config

MESSAGE_OVERHEAD = 4  # role and separator tokens a chat template adds per message (typical)


class TokenCounter:
    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self._cache: dict[str, Any] = {}
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

    def count_text(self, model: str, text: str) -> int:
        tok = self._tokenizer(model)
        if tok is None:
            return (len(text) + 3) // 4
        return len(tok.encode(text, add_special_tokens=False).ids)

    def count_body(self, model: str, endpoint: str, body: dict[str, Any]) -> int:
        if endpoint == "/v1/chat/completions":
            total = 0
            for msg in body.get("messages") or []:
                total += MESSAGE_OVERHEAD + self.count_text(model, _message_text(msg))
            return total
        key = "prompt" if endpoint == "/v1/completions" else "input"
        return self._count_prompt(model, body.get(key))

    def _count_prompt(self, model: str, prompt: Any) -> int:
        if isinstance(prompt, str):
            return self.count_text(model, prompt)
        if isinstance(prompt, list):
            if all(isinstance(t, int) for t in prompt):
                return len(prompt)  # already token ids
            return sum(self._count_prompt(model, p) for p in prompt)
        return 0


def _message_text(msg: Any) -> str:
    if not isinstance(msg, dict):
        return ""
    content = msg.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text parts have tokens we can count
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""
