"""File contents on disk under `<state_dir>/files/<file id>`, never under the user's filename.

Every write is atomic: a temp file in the same directory, fsync, rename, fsync of the directory. A
crash leaves either the old content or the new one, plus at worst a `*.tmp` that `sweep()` removes.
"""

from __future__ import annotations

import codecs
import os
import threading
from pathlib import Path
from typing import Iterable


SYNC_EVERY = 32 << 20  # bytes between background write-backs of a large file (see AtomicWriter)


class TooLarge(Exception):
    pass


class NotUtf8(Exception):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        if "/" in file_id or file_id.startswith("."):  # ids are ours, but never trust a path part
            raise ValueError(f"bad file id {file_id!r}")
        return self.root / file_id

    def sweep(self) -> int:
        """Remove temp files left by a crash mid-write."""
        n = 0
        for p in self.root.glob("*.tmp"):
            p.unlink(missing_ok=True)
            n += 1
        return n

    def writer(self, file_id: str, max_bytes: int | None = None) -> "AtomicWriter":
        return AtomicWriter(self.path(file_id), max_bytes)

    def write_lines(self, file_id: str, lines: Iterable[bytes]) -> int:
        with self.writer(file_id) as w:
            for line in lines:
                w.write(line)
        return w.size

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
        self._done = False
        self._synced = 0  # bytes handed to a background fdatasync so far
        self._syncer: threading.Thread | None = None
        self._sync_error: OSError | None = None

    def check_utf8(self) -> "AtomicWriter":
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        return self

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
                raise NotUtf8(f"not UTF-8 near byte {self.size - len(chunk) + exc.start}") from None
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
                raise NotUtf8("file ends inside a UTF-8 sequence") from None
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)
        _fsync_dir(self.path.parent)
        self._done = True

    def abort(self) -> None:
        if not self._done:
            self._join_sync()  # never close the fd under a running fdatasync
            self._f.close()
            self._tmp.unlink(missing_ok=True)
            self._done = True

    def __enter__(self) -> "AtomicWriter":
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None and not self._done:
            self.commit()
        else:
            self.abort()
