"""Small helpers shared by the views."""

from __future__ import annotations

from typing import Mapping

from gateway.errors import bad_request


def int_param(q: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = q.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        raise bad_request(f"`{name}` must be an integer.", param=name) from None
    if not lo <= v <= hi:
        raise bad_request(f"`{name}` must be between {lo} and {hi}.", param=name)
    return v
