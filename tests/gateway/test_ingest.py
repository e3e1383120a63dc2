"""The streamed ingest path without a server: line splitting across read blocks, items that refer to
their input line instead of holding the body, and the file store's background write-back."""

from __future__ import annotations

import errno
import json
import random
from pathlib import Path

import pytest

import gateway.filestore as filestore
import gateway.lines as line_format
import gateway.validation as validation
from gateway.filestore import AtomicWriter
from gateway.tokens import TokenCounter

from .conftest import chat_line, plan_only_config

CHAT = "/v1/chat/completions"


def _expected(data: bytes, skip: int) -> list[tuple[int, int, bytes]]:
    body = data[skip:]
    parts = body.split(b"\n")
    if body.endswith(b"\n") or not body:
        parts = parts[:-1]
    out, off = [], skip
    for i, part in enumerate(parts, start=1):
        out.append((i, off, part))
        off += len(part) + 1
    return out


@pytest.mark.parametrize("block", [4, 7, 64, 1000])
def test_iter_lines_splits_like_the_file(tmp_path, monkeypatch, block):
    """Lines shorter and longer than a read block, empty lines, a BOM, with and without a final
    newline: the same lines and offsets as splitting the whole file."""
    monkeypatch.setattr(line_format, "READ_BYTES", block)
    rng = random.Random(block)
    path = tmp_path / "f.jsonl"
    for _ in range(60):
        lines = [bytes(rng.choice(b"ab{}\r ") for _ in range(rng.choice([0, 1, 3, 9, 80, 300])))
                 for _ in range(rng.randint(0, 25))]
        bom = b"\xef\xbb\xbf" if rng.random() < 0.3 else b""
        data = bom + b"\n".join(lines) + rng.choice([b"", b"\n"])
        path.write_bytes(data)
        got = [(n, off, bytes(raw)) for n, off, raw in validation.iter_lines(path)]
        assert got == _expected(data, len(bom))
        assert all(data[off:off + len(raw)] == raw for _, off, raw in got)


def test_items_refer_to_their_line_and_read_the_body_back(tmp_path, monkeypatch):
    monkeypatch.setattr(line_format, "READ_BYTES", 64)  # most lines span several blocks
    cfg = plan_only_config(tmp_path / "state")
    lines = [chat_line(f"c{i}", text="word " * (i * 7)) for i in range(12)]
    raw = [json.dumps(ln).encode() for ln in lines]
    data = b"\xef\xbb\xbf" + raw[0] + b"\r\n\r\n" + b"\n\n".join(raw[1:6]) + b"\n" \
        + b"\r\n".join(raw[6:])  # BOM, CRLF, blank lines, no final newline
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    res = validation.validate_file(path, CHAT, cfg, TokenCounter(cfg))
    assert res.ok, res.errors
    assert [it.custom_id for it in res.items] == [ln["custom_id"] for ln in lines]
    for it, ln in zip(res.items, lines):
        assert it.ref is not None and it.ref.path == str(path)
        assert it.body == ln["body"]  # read back from the file, not held
    assert [it.line for it in res.items[:3]] == [1, 3, 5]


def test_prompt_estimate_is_characters_per_token(tmp_path):
    """Without a tokenizer a model counts 4 characters a token; chat adds each message's overhead."""
    cfg = plan_only_config(tmp_path / "state")
    path = tmp_path / "in.jsonl"
    text = "x" * 1001
    path.write_bytes(json.dumps(chat_line("a", text=text)).encode() + b"\n")
    (item,) = validation.validate_file(path, CHAT, cfg, TokenCounter(cfg)).items
    assert item.prompt_tokens == 4 + 251


def test_large_writes_sync_in_the_background(tmp_path, monkeypatch):
    monkeypatch.setattr(filestore, "SYNC_EVERY", 1000)
    chunks = [bytes([65 + i % 26]) * 300 for i in range(50)]
    with AtomicWriter(tmp_path / "f") as w:
        for c in chunks:
            w.write(c)
    assert (tmp_path / "f").read_bytes() == b"".join(chunks)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_failed_background_sync_fails_the_commit(tmp_path, monkeypatch):
    """A write-back error may be reported only once: the writer keeps it for commit."""
    monkeypatch.setattr(filestore, "SYNC_EVERY", 100)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filestore.os, "fdatasync", full)
    w = AtomicWriter(tmp_path / "f")
    for _ in range(5):
        w.write(b"z" * 60)
    with pytest.raises(OSError) as exc:
        w.commit()
    assert exc.value.errno == errno.ENOSPC
    w.abort()
    assert not (tmp_path / "f").exists() and not list(tmp_path.glob("*.tmp"))
