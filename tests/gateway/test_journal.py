"""The outcome journal: durable appends, group commit, torn-tail tolerance; plus the bind check."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest

from gateway.auth import check_bind
from runtime.config import ConfigError
from runtime.executor_api import Outcome
from gateway.journal import Journal, load


def _o(i: int, ok: bool = True) -> Outcome:
    if ok:
        return Outcome(f"c{i}", i + 1, "m", 200, response_body={"n": i, "usage": {}})
    return Outcome(f"c{i}", i + 1, "m", None, error={"code": "engine_died", "message": "x"})


@pytest.mark.asyncio(loop_scope="session")
async def test_append_load_roundtrip_and_group_commit(tmp_path):
    path = tmp_path / "j" / "b.jsonl"
    j = Journal(path)
    await asyncio.gather(*(j.append(_o(i, ok=i % 5 != 0)) for i in range(200)))
    assert j.fsyncs < 20  # 200 concurrent appends share a handful of fsyncs
    await j.append(_o(0))  # a duplicate custom_id: the first record stands
    await j.close()
    got = load(path)
    assert [o.custom_id for o in got] == [f"c{i}" for i in range(200)]
    assert got[0].error == {"code": "engine_died", "message": "x"} and not got[0].ok
    assert got[1].ok and got[1].response_body == {"n": 1, "usage": {}}


@pytest.mark.asyncio(loop_scope="session")
async def test_torn_tail_is_ignored_then_cut(tmp_path):
    path = tmp_path / "b.jsonl"
    j = Journal(path)
    await j.append(_o(1))
    await j.close()
    with open(path, "ab") as f:
        f.write(b'{"custom_id": "c2", "li')
    assert [o.custom_id for o in load(path)] == ["c1"]
    j2 = Journal(path)  # reopening cuts the torn line so new appends start on a fresh line
    await j2.append(_o(3))
    await j2.close()
    assert [o.custom_id for o in load(path)] == ["c1", "c3"]
    assert load(tmp_path / "missing.jsonl") == []


@pytest.mark.asyncio(loop_scope="session")
async def test_append_after_close_fails(tmp_path):
    j = Journal(tmp_path / "b.jsonl")
    await j.close()
    with pytest.raises(RuntimeError):
        await j.append(_o(1))


def test_no_keys_refuses_non_loopback():
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_bind(host, [])
    check_bind("0.0.0.0", ["sk-some-long-key"])
    for host in ("0.0.0.0", "192.168.1.4", "example.com", "::"):
        with pytest.raises(ConfigError):
            check_bind(host, [])


class _FullDisk:
    """os.write stand-in for the journal, as a disk that fills mid-record: the first call writes 7
    bytes (a short write: the caller loops), the second raises ENOSPC, later calls pass."""

    def __init__(self, real) -> None:
        self.real, self.calls = real, 0

    def __call__(self, fd, data):
        self.calls += 1
        if self.calls == 1:
            return self.real(fd, bytes(data[:7]))
        if self.calls == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real(fd, data)


@pytest.mark.asyncio(loop_scope="session")
async def test_failed_append_leaves_no_torn_record_in_the_middle(tmp_path, monkeypatch):
    """A partial write then ENOSPC: the append fails, the fragment is cut, and the next append
    (space back) is a whole record: both acknowledged records load (issue 12, item 1)."""
    import gateway.journal as journal_mod

    path = tmp_path / "b.jsonl"
    j = Journal(path)
    await j.append(_o(1))
    monkeypatch.setattr(journal_mod.os, "write", _FullDisk(os.write))
    with pytest.raises(OSError):
        await j.append(_o(2))
    await j.append(_o(3))  # the disk has room again
    await j.append(_o(2))  # the failed one, retried
    await j.close()
    assert [o.custom_id for o in load(path)] == ["c1", "c3", "c2"]
    assert path.read_bytes().count(b"\n") == 3


def test_garbage_line_in_the_middle_is_reported(tmp_path, caplog):
    path = tmp_path / "b.jsonl"
    good = b'{"custom_id": "c1", "line": 2, "model": "m", "status_code": 200}\n'
    path.write_bytes(good + b'{"custo\n' + good.replace(b"c1", b"c2"))
    with caplog.at_level("WARNING"):
        got = load(path)
    assert [o.custom_id for o in got] == ["c1", "c2"]
    assert "line 2" in caplog.text and "re-run" in caplog.text
