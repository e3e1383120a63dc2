"""Engine start times the runtime measured, persisted under the state dir so they survive restarts.

`<state_dir>/start_times.json` maps "model|tp" to seconds from spawning an engine to a healthy
/health, smoothed over the starts seen (`blend`). The planner's load cost then comes from starts
measured in real runs (several engines starting at once, other work on the machine) rather than from
the profiler's lone start, also right after a gateway restart. Written atomically (temp file +
rename); a missing or unreadable file gives no measurements (the profile's start time is used).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
FILENAME = "start_times.json"
StartTimes = dict[tuple[str, int], float]


def blend(old: float | None, new: float) -> float:
    """Smoothed start time: starts vary with what else is starting, so one slow start moves the
    estimate halfway, not all the way."""
    return new if old is None else 0.5 * (old + new)


def load_start_times(state_dir: Path) -> StartTimes:
    path = Path(state_dir) / FILENAME
    try:
        raw = json.loads(path.read_text())
        out: StartTimes = {}
        for key, seconds in raw.items():
            model, _, tp = key.rpartition("|")
            if model and float(seconds) > 0:
                out[(model, int(tp))] = float(seconds)
        return out
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.warning("ignoring unreadable start times %s (%s)", path, exc)
        return {}


def save_start_times(state_dir: Path, times: StartTimes) -> Path:
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / FILENAME
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".start-times-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({f"{m}|{tp}": round(s, 3) for (m, tp), s in sorted(times.items())}, f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
