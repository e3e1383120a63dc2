"""POSIX shared memory (/dev/shm) of engines: which names an engine's processes hold, the record of
them under the state dir, and clearing the ones no live process uses any more.

Why: an engine's segments (vLLM's psm_* message queues, sparse files of 24-240 MB here; with
AVX-512 kernels at TP > 1 also vllm_dist_*-cpushm_* TP buffers) and semaphores (sem.mp-*) are
unlinked only when its processes shut down, mostly by Python's resource tracker, itself one of the
engine's processes; a group SIGKILLed (the guard after its grace period, the OOM killer, `kill -9`
of everything) leaves them, holding the RAM (tmpfs) they were written into until unlinked. Their
names are random, so shape says nothing about whose they are; what ties a name to an engine is that
a process of the engine maps it or has it open. By inode, not by the path in /proc/<pid>/maps:
glibc's sem_open maps a temporary name, links it to sem.mp-* and unlinks the temporary one, so its
creator's mapping shows "/dev/shm/sem.XXXXXX (deleted)".

A record is `<state_dir>/engines/shm-<pgid>-<ms>.json`, {"pgid": n, "names": {name: inode}}: only
names recorded by this state dir's gateway are ever cleared, and only while the name still has the
recorded inode and no process maps it or has it open (a process whose /proc entries cannot be read
is not seen; the files are mode 0600, so only this user or root can use them). Standard library
only: `runtime.engines.guard` uses it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterable

from runtime.atomic import write_json_atomic

SHM_DIR = Path("/dev/shm")
RECORD_DIR = "engines"  # under the state dir


def _inodes_held(pid: int, dev: int) -> set[int]:
    """Inodes on /dev/shm's filesystem (`dev`) that `pid` maps or has open; empty if unreadable."""
    held: set[int] = set()
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/dev/shm/"):
                    held.add(int(parts[4]))
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if st.st_dev == dev:
                held.add(st.st_ino)
    except OSError:
        pass
    return held


def _held(pids: Iterable[int] | None = None) -> set[int]:
    """Inodes in /dev/shm held by `pids` (None: every process)."""
    if pids is None:
        pids = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    try:
        dev = os.stat(SHM_DIR).st_dev
    except OSError:
        return set()
    return set().union(*(_inodes_held(pid, dev) for pid in pids))


def _present() -> dict[str, int]:
    """name -> inode of the regular files in /dev/shm."""
    try:
        with os.scandir(SHM_DIR) as it:
            return {e.name: e.inode() for e in it if e.is_file(follow_symlinks=False)}
    except OSError:
        return {}


def shm_names(pids: Iterable[int]) -> dict[str, int]:
    """name -> inode of the /dev/shm files that `pids` map or have open."""
    held = _held(list(pids))
    return {name: ino for name, ino in _present().items() if ino in held} if held else {}


def still_present(names: dict[str, int]) -> dict[str, int]:
    """Those of `names` (name -> inode) that /dev/shm still holds as the same file."""
    present = _present()
    return {n: ino for n, ino in names.items() if present.get(n) == ino}


def clear_unused(names: dict[str, int]) -> tuple[list[str], dict[str, int]]:
    """Unlink those of `names` that still have their inode and that no live process holds.
    Returns (unlinked, still held); a name gone or now another file's is in neither."""
    ours = still_present(names)
    if not ours:  # the usual case after a clean stop: no scan of every process
        return [], {}
    held = _held()
    cleared: list[str] = []
    for name, ino in sorted(ours.items()):
        if ino in held:
            continue
        try:
            os.unlink(SHM_DIR / name)
            cleared.append(name)
        except FileNotFoundError:
            pass
    return cleared, {n: ino for n, ino in ours.items() if ino in held}


def save_record(record_dir: Path, pgid: int, names: dict[str, int],
                path: Path | None = None) -> Path:
    """Write (or, with `path`, rewrite) the record of engine group `pgid`'s names."""
    path = path or Path(record_dir) / f"shm-{pgid}-{int(time.time() * 1000)}.json"
    return write_json_atomic(path, {"pgid": pgid, "names": names})


def load_record(path: Path) -> dict[str, int]:
    return _read(path)[1]


def _read(path: Path) -> tuple[int, dict[str, int]]:
    data = json.loads(Path(path).read_text())
    return int(data["pgid"]), {str(n): int(ino) for n, ino in data["names"].items()}


def clear_records(record_dir: Path) -> list[str]:
    """At start-up, before this gateway's engines run: clear what each record under `record_dir`
    names (`clear_unused`), drop the record, or keep in it the names still held. Returns the names
    unlinked. An unreadable record (none of ours: they are written atomically) is dropped."""
    records: dict[Path, tuple[int, dict[str, int]]] = {}
    for path in sorted(Path(record_dir).glob("shm-*.json")):
        try:
            records[path] = _read(path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            path.unlink(missing_ok=True)
    every = {n: ino for _, names in records.values() for n, ino in names.items()}
    cleared, held = clear_unused(every)
    for path, (pgid, names) in records.items():
        kept = {n: ino for n, ino in names.items() if held.get(n) == ino}
        if kept:
            save_record(record_dir, pgid, kept, path)
        else:
            path.unlink(missing_ok=True)
    return cleared
