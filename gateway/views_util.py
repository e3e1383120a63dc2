"""Small helpers shared by the views."""

from __future__ import annotations

from typing import Any, Mapping

from gateway.errors import bad_request


def int_param(q: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = q.get(name)
    if raw is None:  # absent; an empty value is no integer (400, as the document types it)
        return default
    try:
        v = int(raw)
    except ValueError:
        raise bad_request(f"`{name}` must be an integer.", param=name) from None
    if not lo <= v <= hi:
        raise bad_request(f"`{name}` must be between {lo} and {hi}.", param=name)
    return v


def list_page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's list envelope. An empty page's `first_id` / `last_id` are "" (the spec types them
    as strings): the SDK's cursor pager reads `data[-1].id` and `has_more` and never these, and the
    conversation pager stops on a falsy `last_id`; `after=""` means no cursor here."""
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else "",
            "last_id": data[-1]["id"] if data else "", "has_more": has_more}
