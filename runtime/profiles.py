"""Measured latency profiles on disk: `<state_dir>/profiles/<model>--tp<N>--<device>.json`, and
`<model>--tp<N>-t<T>--<device>.json` for CPU ranks on T cores each (threads; files from before
threads existed are the T = 1 ones).

One JSON file per `scheduler.latency.Profile` key (model, TP degree, device signature[, threads]),
written
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


def profile_path(state_dir: str | Path, model: str, tp: int, device: str, threads: int = 1) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model)
    shape = f"tp{tp}" if threads == 1 else f"tp{tp}-t{threads}"
    return profiles_dir(state_dir) / f"{safe}--{shape}--{device}.json"


def save_profile(state_dir: str | Path, profile: Profile) -> Path:
    return write_json_atomic(profile_path(state_dir, *profile.key), profile.to_dict(), indent=2,
                             sort_keys=True)


def load_profile(state_dir: str | Path, model: str, tp: int, device: str,
                 threads: int = 1) -> Profile | None:
    """The stored profile for the key, or None when none was measured (or the file is unreadable)."""
    path = profile_path(state_dir, model, tp, device, threads)
    try:
        prof = Profile.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return prof if prof.threads == threads else None


def load_profiles(state_dir: str | Path) -> dict[tuple, Profile]:
    """Every readable profile under the state dir, by key."""
    out: dict[tuple, Profile] = {}
    d = profiles_dir(state_dir)
    for path in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            p = Profile.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        out[p.key] = p
    return out
