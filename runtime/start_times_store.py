"""Engine start times the runtime measured, persisted under the state dir so they survive restarts.

`<state_dir>/start_times.json` maps "model|tp" to seconds from spawning an engine to a healthy
/health as if it had started alone, smoothed over the starts seen (`blend`). A start measured while
n engines were starting is divided by the pool's contention factor for n (`alone_start_s`,
`DevicePool.start_factor`), which the planner multiplies in again for the starts it plans. The
planner's load cost then comes from starts measured in real runs (other work on the machine)
rather than from the profiler's lone start, also right after a gateway restart. Written atomically (temp file +
rename); a missing or unreadable file gives no measurements (the profile's start time is used).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from runtime.atomic import write_json_atomic

log = logging.getLogger(__name__)
FILENAME = "start_times.json"
StartTimes = dict[tuple[str, int], float]


def blend(old: float | None, new: float) -> float:
    """Smoothed start time: starts vary with what else is starting, so one slow start moves the
    estimate halfway, not all the way."""
    return new if old is None else 0.5 * (old + new)


def alone_start_s(measured_s: float, factor: float) -> float:
    """The start an engine would have taken alone, from one measured while others started with it
    (`factor` = `DevicePool.start_factor(n)` for the n engines starting at once, ≥ 1)."""
    return measured_s / max(1.0, factor)


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
    return write_json_atomic(Path(state_dir) / FILENAME,
                             {f"{m}|{tp}": round(s, 3) for (m, tp), s in sorted(times.items())})
