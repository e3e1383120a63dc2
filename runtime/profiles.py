"""Measured latency profiles on disk: `<state_dir>/profiles/<model>--tp<N>--<device>.json`.

One JSON file per `scheduler.latency.Profile` key (model, TP degree, device signature), written
atomically (temp file + rename) so a reader never sees half a profile.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from runtime.atomic import write_json_atomic
from scheduler.latency import Profile


def profiles_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / "profiles"


def profile_path(state_dir: str | Path, model: str, tp: int, device: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model)
    return profiles_dir(state_dir) / f"{safe}--tp{tp}--{device}.json"


def save_profile(state_dir: str | Path, profile: Profile) -> Path:
    return write_json_atomic(profile_path(state_dir, *profile.key), profile.to_dict(), indent=2,
                             sort_keys=True)


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
