"""Who owns a state dir, and whether what it holds can be served: checked before anything resumes.

One gateway per state dir: two would both resume the same live batches, start engines for them and
append to the same journals. `StateDirLock` is an exclusive `flock` on `<state_dir>/gateway.lock`
(the kernel drops it when the process dies, SIGKILL included, so a crash never leaves a stale lock);
the file holds the owner's pid so the refusal can name it. `open_database` refuses a state dir whose
database is gone while stored files or journals remain (starting empty would orphan them and the
start-up sweep would delete them) and turns an unreadable database into a message, not a traceback.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from pathlib import Path

from gateway.db import Database

LOCK_NAME = "gateway.lock"
DB_NAME = "samullm.db"


class StateDirError(Exception):
    """The gateway cannot serve this state dir; the message says why and what to do."""


class StateDirLock:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "StateDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateDirError(f"the state dir {self.path.parent} is in use by another samullm "
                                f"gateway (pid {holder}); stop it, or give this one another "
                                "--state-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (unlinking would race)
            self._fd = None


def _stored(state_dir: Path) -> tuple[int, int]:
    """(stored files, journals) under the state dir, temp and reserve files not counted."""
    files = [p for p in (state_dir / "files").glob("*")
             if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".tmp")]
    journals = list((state_dir / "journals").glob("*.jsonl"))
    return len(files), len(journals)


def open_database(state_dir: Path) -> Database:
    path = Path(state_dir) / DB_NAME
    if not path.exists():
        n_files, n_journals = _stored(Path(state_dir))
        if n_files or n_journals:
            raise StateDirError(
                f"{path} is missing but the state dir holds {n_files} stored file(s) and "
                f"{n_journals} journal(s): restore the database, or move {state_dir}/files and "
                f"{state_dir}/journals away to start empty")
    try:
        return Database(path)
    except sqlite3.DatabaseError as exc:
        raise StateDirError(f"the database {path} is unreadable ({exc}): restore it from a "
                            "backup, or move it away (with files/ and journals/) to start "
                            "empty") from None
