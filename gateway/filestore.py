"""File contents on disk under `<state_dir>/files/<file id>`, never under the user's filename.

Every write is atomic: a temp file in the same directory, fsync, rename, fsync of the directory. A
crash leaves either the old content or the new one, plus at worst a `*.tmp` that `sweep()` removes.

A reserve file (`RESERVE_BYTES`, next to the files dir, so on the database's disk too) holds back
room for deleting: on a full disk SQLite has no room for a DELETE's WAL frames, and deleting is the
one thing that frees space. The delete path releases it; an upload re-creates it before it starts.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Collection

from runtime.atomic import fsync_dir

SYNC_EVERY = 32 << 20  # bytes between background write-backs of a large file (see AtomicWriter)
# One row's DELETE writes a handful of 4 KiB WAL frames; 1 MiB is ample and costs little on a small
# disk (the fault tests run the whole state dir on a 4 MiB tmpfs).
RESERVE_BYTES = 1 << 20
log = logging.getLogger("samullm.gateway")


class TooLarge(Exception):
    pass


class NotUtf8(Exception):
    pass


class FileStore:
    """`reserve` defaults to `<root's parent>/.reserve`: outside the files dir, which holds stored
    files only (named by id; operators and tests count them)."""

    def __init__(self, root: Path, reserve: Path | None = None,
                 reserve_bytes: int = RESERVE_BYTES) -> None:
        self.root = root
        self.reserve = reserve if reserve is not None else root.parent / ".reserve"
        self.reserve_bytes = reserve_bytes
        root.mkdir(parents=True, exist_ok=True)
        try:
            self.ensure_reserve()
        except OSError as exc:  # a gateway started on a full disk still serves reads and deletes
            log.warning("cannot create the %d-byte delete reserve %s: %s", reserve_bytes,
                        self.reserve, exc)

    def ensure_reserve(self) -> None:
        """Create the reserve unless it is there; OSError (ENOSPC) when the disk lacks the room."""
        if self.reserve_bytes <= 0 or self.reserve.exists():
            return
        tmp = self.reserve.with_name(self.reserve.name + ".tmp")  # a half-made one never counts
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.reserve_bytes)  # blocks, not a sparse hole
            finally:
                os.close(fd)
            os.replace(tmp, self.reserve)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def release_reserve(self) -> bool:
        """Free the reserve's room for what must be written now; False if it was already gone."""
        try:
            self.reserve.unlink()
        except FileNotFoundError:
            return False
        log.warning("disk full: released the %d-byte reserve %s", self.reserve_bytes, self.reserve)
        return True

    def path(self, file_id: str) -> Path:
        if "/" in file_id or file_id.startswith("."):  # ids are ours, but never trust a path part
            raise ValueError(f"bad file id {file_id!r}")
        return self.root / file_id

    def sweep(self, known: Collection[str]) -> list[str]:
        """At start-up, before any batch resumes: remove temp files left by a crash mid-write and
        stored files whose id is not in `known` (the database's file ids): bytes written by an
        upload or a finalize that died before committing the row. Nothing writes here yet, and a
        resumed finalize rewrites its output files under the same derived ids, so none is lost.
        Journals live under `<state_dir>/journals`, never in this directory: this cannot touch
        them. An empty `known` never stands for a lost database: `state_dir.open_database` refuses
        a missing one while stored files remain. Returns the names removed."""
        removed = []
        for p in self.root.iterdir():
            if p.name.startswith(".") or not p.is_file():
                continue  # never ours: ids never start with a dot (see `path`)
            if p.name.endswith(".tmp") or p.name not in known:
                p.unlink(missing_ok=True)
                removed.append(p.name)
        if removed:
            log.warning("start-up sweep removed %d file(s) without a database row from %s: %s",
                        len(removed), self.root, ", ".join(sorted(removed)[:20]) +
                        (", ..." if len(removed) > 20 else ""))
        return removed

    def writer(self, file_id: str, max_bytes: int | None = None) -> "AtomicWriter":
        return AtomicWriter(self.path(file_id), max_bytes)

    def delete(self, file_id: str) -> None:
        self.path(file_id).unlink(missing_ok=True)


class AtomicWriter:
    """Streams bytes to `<path>.tmp`; `commit()` (or leaving the `with` block cleanly) publishes them.
    With `max_bytes`, writing past the limit raises `TooLarge`; `check_utf8` checks incrementally.
    Every SYNC_EVERY bytes a background fdatasync starts, so a large file is mostly on disk by then."""

    def __init__(self, path: Path, max_bytes: int | None = None) -> None:
        self.path, self.max_bytes, self.size = path, max_bytes, 0
        self._tmp = path.with_name(path.name + ".tmp")
        self._f = open(self._tmp, "wb")
        self._decoder: codecs.IncrementalDecoder | None = None
        self._strict = True
        self.not_utf8: str | None = None  # the first problem found by a non-strict check_utf8
        self._done = False
        self._synced = 0  # bytes handed to a background fdatasync so far
        self._syncer: threading.Thread | None = None
        self._sync_error: OSError | None = None

    def check_utf8(self, strict: bool = True) -> "AtomicWriter":
        """Check the bytes are UTF-8 as they are written: `strict` raises NotUtf8 at the first bad
        byte; otherwise the first problem is noted in `not_utf8` and writing goes on (an upload
        whose purpose, read later, decides whether it matters)."""
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._strict = strict
        return self

    def _not_utf8(self, message: str) -> None:
        if self._strict:
            raise NotUtf8(message)
        self.not_utf8, self._decoder = message, None

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            raise TooLarge(f"file exceeds {self.max_bytes} bytes")
        # ASCII needs no decoding (the common case, checked ~50x faster than decoding); the
        # decoder then must hold no partial sequence from the previous chunk
        if self._decoder is not None and not (chunk.isascii() and not self._decoder.getstate()[0]):
            try:
                self._decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                self._not_utf8(f"not UTF-8 near byte {self.size - len(chunk) + exc.start}")
        self._f.write(chunk)
        if self.size - self._synced >= SYNC_EVERY and \
                (self._syncer is None or not self._syncer.is_alive()):
            self._start_sync()

    def _start_sync(self) -> None:
        """Write back what is written so far in a thread (the disk works while the upload goes on),
        so commit's fsync waits for the tail only. An error is kept for commit to raise: a failed
        writeback may not be reported again to a later fsync of the same file."""
        self._f.flush()
        self._synced = self.size
        fd = self._f.fileno()

        def sync() -> None:
            try:
                os.fdatasync(fd)
            except OSError as exc:
                self._sync_error = exc

        self._syncer = threading.Thread(target=sync, name="filestore-sync", daemon=True)
        self._syncer.start()

    def _join_sync(self) -> None:
        if self._syncer is not None:
            self._syncer.join()
            self._syncer = None

    def commit(self) -> None:
        self._join_sync()
        if self._sync_error is not None:
            raise self._sync_error
        if self._decoder is not None:
            try:
                self._decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                self._not_utf8("file ends inside a UTF-8 sequence")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)
        self._done = True

    def abort(self) -> None:
        """Discard the temp file; never raises from closing it. On a full disk, close() flushes the
        buffered tail and fails with ENOSPC: the file must go all the same (its bytes are what
        fills the disk), and the fd is closed by then (a failed flush still closes it)."""
        if not self._done:
            self._done = True
            self._join_sync()  # never close the fd under a running fdatasync
            with contextlib.suppress(OSError):
                self._f.close()
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "AtomicWriter":
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None and not self._done:
            self.commit()
        else:
            self.abort()
