"""Object ids with OpenAI's prefixes: `file-…`, `batch_…`, `batch_req_…`; ours: `batchevent_…`."""

from __future__ import annotations

import hashlib
import secrets


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


def new_event_id() -> str:
    return "batchevent_" + secrets.token_hex(12)


def derived_id(prefix: str, *parts: object) -> str:
    """A stable id from its parts: re-finalizing a batch after a crash rewrites the same objects."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:24]
    return prefix + digest
