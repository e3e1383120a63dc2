"""Which /dev/shm names the gateway clears: those its engines' processes had mapped or open, once no
live process uses them. Real files in /dev/shm held by child processes this test spawns (the
`holder` below), never anything of another program: every name carries this run's random prefix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from runtime.engines import shm
from runtime.config import ModelConfig
from runtime.engines.engine import EngineSpec, VllmLauncher
from runtime.engines.procs import group_pids

REPO = Path(__file__).resolve().parent.parent.parent
SHM = Path("/dev/shm")

# Creates or opens each name (kind:name): "map" creates and mmaps it (vLLM's psm_* and cpushm
# segments), "sem" creates a temporary name, mmaps it, links it to the name and unlinks the
# temporary one (what glibc's sem_open does: the mapping then shows the deleted temporary name, so
# only its inode ties it to sem.mp-*), "fd" creates it and keeps it open without mapping it, "open"
# mmaps an existing name. SIGTERM kills the process: no cleanup, as when a group is SIGKILLed.
CREATE = textwrap.dedent("""
    import mmap, os, sys, time
    keep = []
    def create(args):
        for arg in args:
            kind, path = arg.split(":", 1)
            if kind == "open":
                fd = os.open(path, os.O_RDWR)
            else:
                target = path + ".tmp" if kind == "sem" else path
                fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                os.ftruncate(fd, 4096)
            if kind != "fd":
                keep.append(mmap.mmap(fd, 4096))
                os.close(fd)
            else:
                keep.append(fd)
            if kind == "sem":
                os.link(target, path)
                os.unlink(target)
""")
# The names in argv; prints "ready", then waits.
HOLDER = CREATE + textwrap.dedent("""
    create(sys.argv[1:])
    print("ready", flush=True)
    time.sleep(600)
""")
# An api_server stand-in: the names in $SHM_TEST_NAMES, then /health on --port.
FAKE_ENGINE = CREATE + textwrap.dedent("""
    import http.server
    create(os.environ["SHM_TEST_NAMES"].split())
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
        def log_message(self, *args):
            pass
    port = int(sys.argv[sys.argv.index("--port") + 1])
    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
""")


@pytest.fixture
def names():
    """name(tag) -> a fresh /dev/shm name; whatever is left is removed afterwards."""
    prefix = f"samullm-test-{uuid.uuid4().hex[:12]}-"
    yield lambda tag: prefix + tag
    for p in SHM.glob(prefix + "*"):
        p.unlink(missing_ok=True)


def _holder(*args: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, *args], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def _kill(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait()


def _exists(name: str) -> bool:
    return (SHM / name).exists()


def test_names_of_a_process_are_found_by_inode(names) -> None:
    a, b, c, other = names("map"), names("sem"), names("fd"), names("other")
    (SHM / other).write_bytes(b"x")
    p = _holder(f"map:{SHM / a}", f"sem:{SHM / b}", f"fd:{SHM / c}")
    try:
        found = shm.shm_names([p.pid])
        assert {a, b, c} <= set(found) and other not in found
        assert found[b] == os.stat(SHM / b).st_ino
    finally:
        _kill(p)


def test_startup_clears_recorded_names_no_live_process_uses(names, tmp_path: Path) -> None:
    dead, busy, mine_not, replaced = names("dead"), names("busy"), names("unrecorded"), names("re")
    p = _holder(f"map:{SHM / dead}", f"sem:{SHM / busy}", f"map:{SHM / replaced}")
    (SHM / mine_not).write_bytes(b"x")  # exists, but no engine of ours had it
    record = shm.save_record(tmp_path / "engines", p.pid, shm.shm_names([p.pid]))
    user = _holder(f"open:{SHM / busy}")  # another live process still maps it
    _kill(p)  # the engine died without unlinking anything (SIGKILL)
    (SHM / (replaced + ".new")).write_bytes(b"y")  # the name now belongs to another file
    os.replace(SHM / (replaced + ".new"), SHM / replaced)
    try:
        assert shm.clear_records(tmp_path / "engines") == [dead]
        assert not _exists(dead)
        assert _exists(busy) and _exists(mine_not) and _exists(replaced)
        assert record.exists() and set(shm.load_record(record)) == {busy}  # kept for a later start
        _kill(user)
        assert shm.clear_records(tmp_path / "engines") == [busy]
        assert not _exists(busy) and not record.exists()
    finally:
        for q in (p, user):
            if q.poll() is None:
                _kill(q)


def test_an_unreadable_record_is_dropped_and_clears_nothing(names, tmp_path: Path) -> None:
    keep = names("keep")
    (SHM / keep).write_bytes(b"x")
    bad = tmp_path / "engines" / "shm-1-2.json"
    bad.parent.mkdir()
    bad.write_text('{"names": {"' + keep)
    assert shm.clear_records(tmp_path / "engines") == [] and not bad.exists() and _exists(keep)


async def test_launcher_start_clears_the_state_dirs_records(names, tmp_path: Path) -> None:
    dead = names("dead")
    p = _holder(f"sem:{SHM / dead}")
    shm.save_record(tmp_path / "engines", p.pid, shm.shm_names([p.pid]))
    _kill(p)
    await VllmLauncher(state_dir=tmp_path).start()
    assert not _exists(dead) and not list((tmp_path / "engines").iterdir())


@pytest.fixture
def fake_engine(names, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """start() -> (engine, map name, sem name): an engine launched by a VllmLauncher on the state
    dir tmp_path whose "python" runs the guard for real and FAKE_ENGINE in place of vLLM."""
    python = tmp_path / "python"
    real = sys.executable
    python.write_text(f'#!/bin/sh\nif [ "$2" = runtime.engines.guard ]; then exec {real} "$@"; fi\n'
                      f'exec {real} -c "$FAKE_ENGINE" "$@"\n')
    python.chmod(0o755)
    a, b = names("map"), names("sem")
    monkeypatch.setenv("FAKE_ENGINE", FAKE_ENGINE)
    monkeypatch.setenv("SHM_TEST_NAMES", f"map:{SHM / a} sem:{SHM / b}")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    spec = EngineSpec(model=ModelConfig(name="fake", path=str(tmp_path)), model_path=tmp_path,
                      devices=(0,), log_path=tmp_path / "engine.log")

    async def start():
        launcher = VllmLauncher(python=str(python), state_dir=tmp_path)
        return await launcher.launch(spec), a, b
    return start


async def test_engine_records_its_names_and_a_restart_clears_them(fake_engine, tmp_path) -> None:
    engine, a, b = await fake_engine()
    try:
        records = list((tmp_path / "engines").glob("shm-*.json"))
        assert len(records) == 1 and {a, b} <= set(shm.load_record(records[0]))
        os.killpg(engine.pid, signal.SIGKILL)  # the guard too: only a restart can clear them
        deadline = time.monotonic() + 10
        while group_pids(engine.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _exists(a) and _exists(b)
        await VllmLauncher(state_dir=tmp_path).start()
        assert not _exists(a) and not _exists(b) and not records[0].exists()
    finally:
        await engine.stop()


async def test_stopped_engine_leaves_no_names_and_no_record(fake_engine, tmp_path) -> None:
    engine, a, b = await fake_engine()
    assert list((tmp_path / "engines").glob("shm-*.json"))
    await engine.stop()  # the stand-in dies of SIGTERM without unlinking: stop() must
    assert not _exists(a) and not _exists(b)
    assert not list((tmp_path / "engines").glob("shm-*.json"))


# A gateway (this child) starts the guard the way runtime.engines.engine does, prints the guard's pid and
# waits; the guard's command is a holder. SIGKILLing this child is the gateway's SIGKILL.
GATEWAY = textwrap.dedent("""
    import subprocess, sys, time
    from runtime.engines.engine import child_setup
    g = subprocess.Popen([sys.executable, "-m", "runtime.engines.guard", sys.executable, "-c",
                          *sys.argv[1:]], start_new_session=True, preexec_fn=child_setup(0))
    print(g.pid, flush=True)
    time.sleep(600)
""")


def test_guard_clears_its_groups_names_after_the_gateway_is_killed(names) -> None:
    a, b, shared, other = names("map"), names("sem"), names("shared"), names("other")
    (SHM / shared).write_bytes(b"s" * 4096)
    (SHM / other).write_bytes(b"x")  # not the group's
    user = _holder(f"open:{SHM / shared}")  # outlives the group
    gw = subprocess.Popen([sys.executable, "-c", GATEWAY, HOLDER, f"map:{SHM / a}",
                           f"sem:{SHM / b}", f"open:{SHM / shared}"],
                          stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert gw.stdout is not None
        guard = int(gw.stdout.readline())
        assert gw.stdout.readline().strip() == "ready"  # the holder's line (it shares stdout)
        assert {a, b, shared} <= set(shm.shm_names(group_pids(guard)))
        _kill(gw)
        deadline = time.monotonic() + 30
        while group_pids(guard) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not group_pids(guard)
        assert not _exists(a) and not _exists(b)
        assert _exists(shared) and _exists(other)
    finally:
        _kill(user)
        if gw.poll() is None:
            _kill(gw)
