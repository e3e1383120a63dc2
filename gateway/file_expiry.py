"""File expiry: `expires_after {anchor: "created_at", seconds}` on upload and `output_expires_after`
on batch create (the output and error files), in OpenAI's range (an hour to 30 days), and the sweep
that deletes expired files, content and row.

An expired file reads as deleted at once: the views pass the gateway clock's `now` to
`Database.get_file` / `list_files`, which hide it. The background sweep (`sweep`, on the gateway's
expiry loop and clock) then deletes its bytes and row, except for the input file of a live batch:
the executor reads each request's body back from that file by offset when it sends it
(`gateway.lines.LineRef`), and finalizing reads it for the output files' order. Its row (which also
keeps the bytes through a restart's start-up sweep) and bytes stay until the batch is terminal; the
first sweep after that deletes them. So a batch keeps working on what it accepted.
"""

from __future__ import annotations

import logging
from typing import Any

from gateway.db import Database
from gateway.errors import bad_request
from gateway.filestore import FileStore

MIN_S, MAX_S = 3600, 30 * 86400  # OpenAI's range for expires_after.seconds
ANCHOR = "created_at"  # the one anchor the spec has
log = logging.getLogger("samullm.gateway")


def expiry_seconds(value: Any, param: str) -> int | None:
    """The seconds of an expiry policy `{anchor, seconds}` (None when absent); 400 naming
    `<param>.anchor` or `<param>.seconds` otherwise. Multipart fields arrive as strings."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request(f"`{param}` must be an object {{anchor, seconds}}.", param=param)
    anchor, seconds = value.get("anchor"), value.get("seconds")
    for name, v in (("anchor", anchor), ("seconds", seconds)):
        if v is None:
            raise bad_request(f"Missing required parameter: '{param}.{name}'.",
                              param=f"{param}.{name}", code="missing_required_parameter")
    if anchor != ANCHOR:
        raise bad_request(f"Invalid value for '{param}.anchor': only {ANCHOR!r} is supported.",
                          param=f"{param}.anchor", code="invalid_value")
    if isinstance(seconds, str) and seconds.strip().isdigit() and len(seconds) < 12:
        seconds = int(seconds)
    elif seconds.__class__ is float and seconds.is_integer():  # JSON Schema's integer: 3600.0
        seconds = int(seconds)
    if seconds.__class__ is not int or not MIN_S <= seconds <= MAX_S:
        raise bad_request(f"Invalid value for '{param}.seconds': an integer from {MIN_S} to "
                          f"{MAX_S} (30 days).", param=f"{param}.seconds", code="invalid_value")
    return seconds


def sweep(db: Database, store: FileStore, now: int) -> list[str]:
    """Delete every file expired by `now` that no live batch reads (bytes first: a row without
    bytes reads as missing content, bytes without a row would be unowned). Returns their ids."""
    gone = db.expired_files(now)
    for file_id in gone:
        store.delete(file_id)
        db.delete_expired_file(file_id, now)
    if gone:
        log.info("deleted %d expired file(s): %s", len(gone), ", ".join(gone[:20]))
    return gone
