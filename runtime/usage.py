"""The token counts of an engine's answer, whatever its endpoint names them.

Chat, completions and embeddings report `usage.prompt_tokens` / `completion_tokens` (and the
prefix-cache hits in `prompt_tokens_details.cached_tokens`); the Responses API reports
`usage.input_tokens` / `output_tokens` (`input_tokens_details.cached_tokens`). Every reader of a
usage (the length model, online calibration, dependent requests, the batch's own usage totals)
goes through here, so a responses batch is counted like the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Usage:
    """Token counts of one answer; None where the engine did not say (or said nonsense)."""

    prompt: int | None
    output: int | None
    cached: int | None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def usage_of(body: Any) -> Usage:
    """The counts in a response body's `usage` (all None without one)."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return Usage(None, None, None)
    prompt = _count(usage.get("prompt_tokens"))
    if prompt is None:
        prompt = _count(usage.get("input_tokens"))
    output = _count(usage.get("completion_tokens"))
    if output is None:
        output = _count(usage.get("output_tokens"))
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
    return Usage(prompt, output, cached)


def hit_length_cap(body: Any) -> list[bool]:
    """Per generated answer, whether it stopped at its token cap (a censored length): chat and
    completions say so in each choice's `finish_reason`, a response in its `incomplete_details`."""
    if not isinstance(body, dict):
        return [False]
    choices = body.get("choices")
    if isinstance(choices, list) and choices:
        return [isinstance(c, dict) and c.get("finish_reason") == "length" for c in choices]
    details = body.get("incomplete_details")
    return [isinstance(details, dict) and details.get("reason") == "max_output_tokens"]
