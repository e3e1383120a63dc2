"""Fixtures shared by the fault tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

DISK_MB = 8  # room for a 3,000-request batch: input, journal, WAL, 1 MiB reserve and its output


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root / CAP_SYS_ADMIN): {r.stderr}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill_disk(filler: Path) -> None:
    """Take every free byte of the file system `filler` is on. Unbuffered, in shrinking chunks: a
    buffered file kept the tail of a short write and raised ENOSPC again when closed (it did once
    the free space stopped being a multiple of 64 KiB)."""
    with open(filler, "wb", buffering=0) as f:
        chunk = 1 << 16
        while chunk:
            try:
                f.write(b"\0" * chunk)
            except OSError:
                chunk //= 2
