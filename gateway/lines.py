"""The JSONL line format of batch input files, read in one place: the streaming reader validation
uses (`iter_lines`), where a validated request's line lies (`LineRef`, whose body the executor loads
when it sends the request: the runtime never parses this format), and the (line, custom_id, model)
of each request of a validated file (`input_requests`, for the output files)."""

from __future__ import annotations

import codecs
import re
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import orjson

from runtime.config import LimitsConfig

READ_BYTES = 8 << 20  # large reads: per-line buffered reads cost more than the JSON parse


class LineRef(NamedTuple):
    """Where a request's line lies in the stored input file. Bodies are read back when the request is
    sent, so a queued 200 MB batch costs the executor a few dozen bytes per request, not its bodies.
    (A tuple: validation makes one per request, and tuples are the cheapest objects to make.)"""

    path: str
    offset: int  # byte offset of the line in the file
    length: int  # bytes, without the newline

    def load_body(self) -> dict[str, Any]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.length)
        body = orjson.loads(data)["body"]
        if not isinstance(body, dict):
            raise ValueError("the stored request line has no body object")
        return body


OVERLONG = memoryview(b"")  # what iter_lines yields in place of a line over its length limit


def iter_lines(path: Path, max_line_bytes: int = LimitsConfig.max_line_bytes
               ) -> Iterator[tuple[int, int, memoryview]]:
    """(1-based line number, byte offset, line without its newline) for every line of the file, a
    leading UTF-8 BOM skipped. Read in READ_BYTES blocks into one reused buffer (a fresh 8 MB block per
    read costs page faults and zeroing); a line longer than a block is joined once. A line over
    `max_line_bytes` is yielded as OVERLONG and never held: its pieces are dropped as they are read
    (a 190 MB line, kept and joined, took the gateway to 981 MB). A yielded line is valid until the
    next one is asked for."""
    lineno, first = 0, True
    block_off = line_start = 0  # file offsets of buf[0] and of the line being joined
    pending: list[bytes] = []  # pieces of a line that spans blocks
    held = 0  # bytes of the line being joined, read so far
    skipping = False  # the line being joined is over max_line_bytes: read on to its end only
    buf = bytearray(READ_BYTES)
    whole = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            view = whole[:n] if n < READ_BYTES else whole
            start = 0
            if first:
                first = False
                if bytes(view[:3]) == codecs.BOM_UTF8:  # editors on Windows write one; not JSON
                    start = 3
            if pending or skipping:
                nl = buf.find(b"\n", 0, n)
                end = n if nl < 0 else nl
                if not skipping:
                    held += end
                    skipping = held > max_line_bytes
                    if skipping:
                        pending.clear()
                    else:
                        pending.append(bytes(view[:end]))
                if nl < 0:
                    block_off += n
                    continue
                lineno += 1
                yield lineno, line_start, OVERLONG if skipping else memoryview(b"".join(pending))
                pending.clear()
                skipping = False
                start = nl + 1
            while (nl := buf.find(b"\n", start, n)) >= 0:
                lineno += 1
                yield lineno, block_off + start, (view[start:nl] if nl - start <= max_line_bytes
                                                  else OVERLONG)
                start = nl + 1
            if start < n:
                line_start = block_off + start
                held = n - start
                skipping = held > max_line_bytes
                if not skipping:
                    pending.append(bytes(view[start:n]))
            block_off += n
    if pending or skipping:
        yield lineno + 1, line_start, OVERLONG if skipping else memoryview(b"".join(pending))


def strip_bom(first_line: bytes) -> bytes:
    """Editors on Windows start UTF-8 files with a byte-order mark; it is not part of the JSON."""
    return first_line[3:] if first_line.startswith(codecs.BOM_UTF8) else first_line


Requests = Iterator[tuple[int, str, str]]  # (line, custom_id, model) in input order


def input_requests(path: Path) -> Requests:
    """(line, custom_id, model) of each request of an already validated input file."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                raw = strip_bom(raw)  # accepted by validation
            if raw.strip():
                obj = orjson.loads(raw)
                yield lineno, obj["custom_id"], obj["body"]["model"]


# read block of `count_lines`: its C calls hold the GIL for a block, ~1 ms per MiB, so the event
# loop waits for one block at most, not a big one
COUNT_BYTES = 1 << 20
# a blank line between two newlines (lookahead: the closing newline opens the next line)
_BLANK = re.compile(rb"\n[ \t\r\x0b\x0c]*(?=\n)")


def count_lines(path: Path) -> int:
    """Non-blank lines of a file: the requests of a valid batch input (validation skips lines of
    whitespace only, and a leading UTF-8 BOM), counted without parsing JSON: per block, newlines
    by `bytes.count` and blank lines by one regex scan (matches only blank lines), ~1 GB/s.
    Memory stays one block, however long a line is."""
    count, open_line = 0, False  # open_line: the line running into this block has a non-space
    with open(path, "rb") as f:
        first = True
        while block := f.read(COUNT_BYTES):
            if first:
                first = False
                if block.startswith(codecs.BOM_UTF8):
                    block = block[3:]
            i = block.find(b"\n")
            if i < 0:
                open_line = open_line or (bool(block) and not block.isspace())
                continue
            if open_line or (i > 0 and not block[:i].isspace()):
                count += 1  # the line ending at the block's first newline
            j = block.rfind(b"\n")
            if j > i:  # the lines between the first and the last newline
                count += block.count(b"\n", i, j + 1) - 1 - len(_BLANK.findall(block, i, j + 1))
            tail = block[j + 1:]
            open_line = bool(tail) and not tail.isspace()
    return count + int(open_line)
