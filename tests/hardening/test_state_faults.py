"""Faults of the state dir (issue 12): a disk that fills while a batch runs or finalizes, a runner
that raises, an input file gone from disk, a foreign journal record, two gateways on one state dir,
a deleted or corrupt database. Real SQLite, real files, the real gateway app; a full disk is a small
tmpfs where this machine can mount one, an injected ENOSPC otherwise (and always, for the parts a
tmpfs cannot time)."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import httpx
import pytest

import gateway.batches as batches_mod
import gateway.journal as journal_mod
from gateway.state_dir import StateDirError
from runtime.config import parse_config
from runtime.executor.executor import PoolExecutor
from runtime.executor_api import Outcome
from gateway.journal import journal_path
from scheduler.types import DevicePool
from tests.gateway.conftest import (chat_line, held_batch, jsonl, plan_only_config, poll,
                                    read_lines, running)
from tests.gateway.doubles import EchoExecutor
from tests.hardening.conftest import fill_disk
from tests.runtime.fakes import FakeLauncher

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(120)]
CHAT = "/v1/chat/completions"
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def cfg(tmp_path):
    return plan_only_config(tmp_path / "state")


def engine_config(state: Path):
    """One chat model the test-double launcher can start (a path, never read: no weights)."""
    arch = {"num_layers": 2, "hidden_size": 128, "num_heads": 2, "num_kv_heads": 1,
            "intermediate_size": 512, "vocab_size": 2048}
    return parse_config({"server": {"state_dir": str(state)},
                         "devices": {"kind": "cpu", "cpu_kvcache_gib": 0.25},
                         "models": [{"name": "tiny-a", "path": "/nonexistent/tiny-a", "arch": arch,
                                     "max_model_len": 1024, "max_num_seqs": 8}]})


def pool_executor(cfg, delay_s: float) -> tuple[PoolExecutor, FakeLauncher]:
    launcher = FakeLauncher(delay_s={"tiny-a": delay_s})
    pool = DevicePool("cpu", (0, 1), int(0.25 * 2**30))
    return PoolExecutor(cfg, launcher, pool=pool), launcher


class InjectedFullDisk:
    """The journal's os.write raises ENOSPC while `full` (after writing part of what it was given
    the first time, as a filling disk does)."""

    def __init__(self, monkeypatch) -> None:
        self.full, self._real, self._torn = False, os.write, False
        monkeypatch.setattr(journal_mod.os, "write", self._write)

    def _write(self, fd, data):
        if self.full:
            if not self._torn:
                self._torn = True
                return self._real(fd, bytes(data[:5]))
            raise ENOSPC
        return self._real(fd, data)

    def fill(self) -> None:
        self.full = True

    def free(self) -> None:
        self.full = False


class TmpfsFullDisk:
    """A real full disk: a file that takes every free byte of the tmpfs the state dir is on."""

    def __init__(self, mnt: Path) -> None:
        self.filler = mnt / "filler"

    def fill(self) -> None:
        fill_disk(self.filler)

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture(params=["injected", "tmpfs"])
def full_disk(request, tmp_path, monkeypatch):
    if request.param == "injected":
        return tmp_path / "state", InjectedFullDisk(monkeypatch)
    mnt = request.getfixturevalue("small_disk")
    return mnt / "state", TmpfsFullDisk(mnt)


async def test_disk_full_mid_batch_pauses_then_finishes_exactly_once(full_disk):
    """Item 1: results that cannot be journaled are not counted; the batch pauses and, once space
    returns, finishes with every custom_id exactly once (no `batch_incomplete`), without a restart."""
    state, disk = full_disk
    cfg = engine_config(state)
    ex, launcher = pool_executor(cfg, delay_s=0.05)
    n = 3000
    async with running(cfg, ex) as srv:
        client = srv.client()
        f = await client.files.create(file=("in.jsonl", jsonl([chat_line(f"r{i}") for i in range(n)])),
                                      purpose="batch")
        b = await client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
        await poll(client, b.id, lambda x: x.request_counts.completed >= n // 10)
        disk.fill()
        await asyncio.sleep(1.5)
        stalled = await client.batches.retrieve(b.id)
        sent = len(launcher.posts)
        await asyncio.sleep(1.0)
        assert len(launcher.posts) == sent, "requests were sent while results could not be stored"
        assert (await client.batches.retrieve(b.id)).request_counts.completed == \
            stalled.request_counts.completed
        assert stalled.status == "in_progress" and stalled.request_counts.completed < n
        assert "storage_stalled" in [e["event"] for e in ex.events(b.id)]
        disk.free()
        done = await poll(client, b.id, timeout_s=90)
        assert done.status == "completed", done
        out = await read_lines(client, done.output_file_id)
        assert sorted(x["custom_id"] for x in out) == sorted(f"r{i}" for i in range(n))
        assert done.error_file_id is None and done.request_counts.completed == n
    assert not list((state / "files").glob("*.tmp"))


async def test_finalize_retries_until_the_disk_has_room(cfg, monkeypatch):
    """Item 5: a full disk while finalizing (here a cancel) does not leave the batch `cancelling`:
    finalize tries again until it succeeds."""
    monkeypatch.setattr(batches_mod, "RETRY_S", (0.05, 0.1))
    real, calls = batches_mod.write_result_files, []

    def write(*a, **kw):
        calls.append(1)
        if len(calls) <= 2:
            raise ENOSPC
        return real(*a, **kw)

    monkeypatch.setattr(batches_mod, "write_result_files", write)
    async with running(cfg) as srv:
        client = srv.client()
        _, b = await held_batch(srv, [chat_line("a"), chat_line("b")], finished=1)
        await client.batches.cancel(b.id)
        done = await poll(client, b.id)
        assert done.status == "cancelled" and len(calls) == 3
        err = await read_lines(client, done.error_file_id)
        assert [e["error"]["code"] for e in err] == ["batch_cancelled"]


async def test_an_unexpected_runner_exception_fails_the_batch(cfg, monkeypatch):
    """Item 3: any exception in a batch's runner ends the batch `failed` with an error saying so
    (never a runner-less batch in `validating` that cannot be cancelled or have its file deleted)."""
    def broken(*a, **kw):
        raise RuntimeError("validator bug")

    monkeypatch.setattr(batches_mod, "validate_file", broken)
    async with running(cfg) as srv:
        client = srv.client()
        f = await client.files.create(file=("in.jsonl", jsonl([chat_line("a")])), purpose="batch")
        b = await client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
        done = await poll(client, b.id)
        assert done.status == "failed"
        assert done.errors.data[0].code == "internal_error"
        assert "RuntimeError: validator bug" in done.errors.data[0].message
        await client.files.delete(f.id)  # no longer held by a live batch


async def test_an_input_file_missing_at_restart_fails_with_what_was_journaled(cfg):
    """Item 4: the batch fails with a clear error; outputs journaled so far are still written."""
    lines = [chat_line(f"r{i}") for i in range(6)]
    async with running(cfg) as srv:
        f, b = await held_batch(srv, lines, finished=3)
    (cfg.state_dir / "files" / f.id).unlink()
    async with running(cfg) as srv2:
        client = srv2.client()
        done = await poll(client, b.id)
        assert done.status == "failed" and done.errors.data[0].code == "input_file_missing"
        assert f.id in done.errors.data[0].message
        out = await read_lines(client, done.output_file_id)
        assert len(out) == 3 and {x["custom_id"] for x in out} <= {f"r{i}" for i in range(6)}
        assert done.request_counts.completed == 3
        assert b.id not in srv2.executor.submitted


async def test_a_journal_record_of_another_custom_id_is_not_counted(cfg):
    """Item 10: a record for a custom_id not in the batch never makes `completed` exceed `total`."""
    async with running(cfg) as srv:
        _, b = await held_batch(srv, [chat_line("a"), chat_line("b")])
    stranger = Outcome("zzz", 9, "tiny-a", 200, response_body={"usage": {}})
    path = journal_path(cfg.state_dir, b.id)
    path.parent.mkdir(parents=True, exist_ok=True)  # the runner may not have opened it yet
    with open(path, "ab") as j:
        j.write(journal_mod._encode(stranger))
    async with running(cfg) as srv2:
        client = srv2.client()
        done = await poll(client, b.id)
        assert done.status == "completed"
        assert (done.request_counts.total, done.request_counts.completed) == (2, 2)
        out = await read_lines(client, done.output_file_id)
        assert sorted(x["custom_id"] for x in out) == ["a", "b"]


async def test_a_second_gateway_on_the_same_state_dir_is_refused(cfg):
    """Item 2: the second gateway fails before it opens or resumes anything, naming the holder."""
    async with running(cfg):
        second = EchoExecutor()
        with pytest.raises(StateDirError, match=f"pid {os.getpid()}"):
            async with running(cfg, second):
                pass
        assert not second.started
    async with running(cfg):  # the lock went with the first gateway
        pass


async def test_a_deleted_database_with_stored_files_is_refused(cfg):
    """Item 10: starting empty would orphan the stored files (and the sweep would delete them)."""
    async with running(cfg) as srv:
        await srv.client().files.create(file=("in.jsonl", jsonl([chat_line("a")])),
                                        purpose="batch")
    (cfg.state_dir / "samullm.db").unlink()
    with pytest.raises(StateDirError, match="1 stored file"):
        async with running(cfg):
            pass
    assert len(list((cfg.state_dir / "files").iterdir())) >= 1  # nothing was deleted


async def test_a_corrupt_database_is_a_clear_error(cfg):
    cfg.state_dir.mkdir(parents=True)
    (cfg.state_dir / "samullm.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateDirError, match="unreadable"):
        async with running(cfg):
            pass



async def test_content_of_a_file_missing_from_disk_is_an_openai_error(cfg):
    """Item 4: the content route answered 404 with an empty body."""
    async with running(cfg) as srv:
        f = await srv.client().files.create(file=("in.jsonl", jsonl([chat_line("a")])),
                                            purpose="batch")
        (cfg.state_dir / "files" / f.id).unlink()
        async with httpx.AsyncClient() as http:
            r = await http.get(f"{srv.url}/v1/files/{f.id}/content")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "file_content_missing" and f.id in r.text
