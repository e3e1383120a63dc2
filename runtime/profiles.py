"""Measured latency profiles on disk: `<state_dir>/profiles/<model>--tp<N>--<device>.json`.

One JSON file per `scheduler.latency.Profile` key (model, TP degree, device signature), written
atomically (temp file + rename) so a reader never sees half a profile.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from scheduler.latency import Profile


def profiles_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / "profiles"


def profile_path(state_dir: str | Path, model: str, tp: int, device: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model)
    return profiles_dir(state_dir) / f"{safe}--tp{tp}--{device}.json"


def save_profile(state_dir: str | Path, profile: Profile) -> Path:
    path = profile_path(state_dir, *profile.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".profile-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(profile.to_dict(), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def load_profile(state_dir: str | Path, model: str, tp: int, device: str) -> Profile | None:
    """The stored profile for the key, or None when none was measured (or the file is unreadable)."""
    path = profile_path(state_dir, model, tp, device)
    try:
        return Profile.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_profiles(state_dir: str | Path) -> dict[tuple[str, int, str], Profile]:
    """Every readable profile under the state dir, by key."""
    out: dict[tuple[str, int, str], Profile] = {}
    d = profiles_dir(state_dir)
    for path in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            p = Profile.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        out[p.key] = p
    return out
