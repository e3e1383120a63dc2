"""The one atomic writer of the project's small files, standard library only (the engine guard
imports it, and must start in milliseconds).

Temp file in the same directory + fsync + rename + fsync of the directory: a reader (or a restarted
gateway) sees the old file or the new one, never half of one, and the rename survives a crash; a
failed write leaves no temp file behind. The gateway's streaming `AtomicWriter` ends the same way
(`fsync_dir`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any, **dump_kwargs: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, **dump_kwargs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself durable, as the file store's commits are
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
