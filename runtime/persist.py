"""The runtime's small state files under the state dir, and the one way they are written.

Every file is JSON written by `runtime.atomic.write_json_atomic` (temp file in the same directory,
fsync, rename, fsync of the directory): a reader, or a restarted gateway, sees the old file or the new one, never half
of one, and a failed write leaves no temp file. A missing or unreadable file gives the default (and a
warning), never a failed start.

- `lengths.json`: the learned output-length model (`scheduler.lengths.LengthModel`), saved at each
  re-plan; without it the shipped prior.
- `start_times.json`: "model|tp" (one core per rank on CPU, and every GPU engine) or "model|tpxT"
  (T cores per rank, which start slower: `runtime.engines.api_server`) -> seconds from spawning an
  engine to a healthy /health as if it had started alone (`alone_start_s` divides a start measured
  while n engines started by the pool's contention factor, which the planner multiplies in again),
  smoothed over the starts seen (`blend`), so the planner's load cost comes from real runs, also
  right after a restart.
- `stop_time.json`: {"stop_s": seconds} an engine's stop took (SIGTERM to reaped, smoothed by
  `blend`): starts wait for the stops of their stage, so the planner prices them; kept, a restart
  prices them as measured rather than by `latency_source.DEFAULT_STOP_S`.
- `profiles/<model>--tp<N>[-t<T>]--<device>.json`: measured latency profiles
  (`scheduler.latency.Profile`), T = cores per rank on CPU (files without `-t` are T = 1).
- `calibration.json`: the online calibration (`scheduler.online`): per (model, tp, threads,
  device) the window of served requests (per engine run: [queued, sent, answered] seconds from the
  run's first send, prompt and output tokens) and the scales fitted to it with their evidence,
  saved at each re-plan that learned something, so a restarted gateway and `samullm plan` use them.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Mapping

from runtime.atomic import write_json_atomic
from scheduler.latency import Profile
from scheduler.lengths import LengthModel
from scheduler.online import ShapeFit, windows_from_dict, windows_to_dict
from scheduler.served import ServedLog, ShapeKey, ShapeWindow

log = logging.getLogger(__name__)


# --- learned output lengths ----------------------------------------------------------------
LENGTHS_FILE = "lengths.json"


def load_length_model(state_dir: Path) -> LengthModel:
    path = Path(state_dir) / LENGTHS_FILE
    try:
        return LengthModel.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return LengthModel()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable length model %s (%s); starting from the prior", path, exc)
        return LengthModel()


def save_length_model(state_dir: Path, model: LengthModel) -> Path:
    return write_json_atomic(Path(state_dir) / LENGTHS_FILE, model.to_dict())


# --- measured engine start times ------------------------------------------------------------
START_TIMES_FILE = "start_times.json"
StartTimes = dict[tuple[str, int, int], float]  # (model, tp, cores per rank) -> seconds


def blend(old: float | None, new: float) -> float:
    """Smoothed start time: starts vary with what else is starting, so one slow start moves the
    estimate halfway, not all the way."""
    return new if old is None else 0.5 * (old + new)


def alone_start_s(measured_s: float, factor: float) -> float:
    """The start an engine would have taken alone, from one measured while others started with it
    (`factor` = `DevicePool.start_factor(n)` for the n engines starting at once, ≥ 1)."""
    return measured_s / max(1.0, factor)


def start_times_file(backend: str = "local") -> str:
    """Where a backend's start times are kept: an engine on a Ray cluster starts through a
    placement group and an actor, with no spare process, so its starts are kept apart from this
    machine's (`[cluster] backend`)."""
    return START_TIMES_FILE if backend == "local" else f"start_times-{backend}.json"


def load_start_times(state_dir: Path, name: str = START_TIMES_FILE) -> StartTimes:
    path = Path(state_dir) / name
    try:
        raw = json.loads(path.read_text())
        out: StartTimes = {}
        for key, seconds in raw.items():
            model, _, shape = key.rpartition("|")
            tp, _, threads = shape.partition("x")
            if model and float(seconds) > 0:
                out[(model, int(tp), int(threads or 1))] = float(seconds)
        return out
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.warning("ignoring unreadable start times %s (%s)", path, exc)
        return {}


def save_start_times(state_dir: Path, times: StartTimes, name: str = START_TIMES_FILE) -> Path:
    return write_json_atomic(Path(state_dir) / name,
                             {start_key(*k): round(s, 3) for k, s in sorted(times.items())})


def start_key(model: str, tp: int, threads: int) -> str:
    """A shape's key in `start_times.json` (files written before threads were kept: all "model|tp",
    which is threads = 1)."""
    return f"{model}|{tp}" if threads == 1 else f"{model}|{tp}x{threads}"


STOP_TIME_FILE = "stop_time.json"


def stop_time_file(backend: str = "local") -> str:
    """Where a backend's engine stop time is kept (a Ray actor's stop is not a process's)."""
    return STOP_TIME_FILE if backend == "local" else f"stop_time-{backend}.json"


def load_stop_time(state_dir: Path, name: str = STOP_TIME_FILE) -> float | None:
    """The engine stop measured before (seconds, smoothed), or None: none measured, or a file
    that cannot be read (the planner's default then, as before any stop)."""
    try:
        seconds = float(json.loads((Path(state_dir) / name).read_text())["stop_s"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable %s (%s)", name, exc)
        return None
    return seconds if seconds >= 0 else None


def save_stop_time(state_dir: Path, seconds: float, name: str = STOP_TIME_FILE) -> Path:
    return write_json_atomic(Path(state_dir) / name, {"stop_s": round(seconds, 3)})


# --- online calibration -----------------------------------------------------------------------
CALIBRATION_FILE = "calibration.json"


def load_calibration(state_dir: Path, window: int) -> tuple[ServedLog, dict[ShapeKey, ShapeFit]]:
    """The stored served-request windows (as a log keeping `window` per shape) and fits; empty
    ones when there is no file, or (with a warning) when it cannot be read."""
    path = Path(state_dir) / CALIBRATION_FILE
    try:
        windows, fits = windows_from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return ServedLog(window), {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring unreadable calibration %s (%s); calibrating afresh", path, exc)
        return ServedLog(window), {}
    return ServedLog.from_windows(windows, window), fits


def save_calibration(state_dir: Path, windows: Mapping[ShapeKey, ShapeWindow],
                     fits: Mapping[ShapeKey, ShapeFit]) -> Path:
    return write_json_atomic(Path(state_dir) / CALIBRATION_FILE, windows_to_dict(windows, fits))


# --- latency profiles ------------------------------------------------------------------------
def profiles_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / "profiles"


def profile_path(state_dir: str | Path, model: str, tp: int, device: str, threads: int = 1) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model)
    shape = f"tp{tp}" if threads == 1 else f"tp{tp}-t{threads}"
    return profiles_dir(state_dir) / f"{safe}--{shape}--{device}.json"


def save_profile(state_dir: str | Path, profile: Profile) -> Path:
    return write_json_atomic(profile_path(state_dir, *profile.key), profile.to_dict(), indent=2,
                             sort_keys=True)


# path -> (inode, mtime_ns, size, profile): every planning pass asks for every model's profiles,
# which change only when the profiler writes one (an atomic rename: a new inode)
_PROFILE_CACHE: dict[Path, tuple[int, int, int, Profile | None]] = {}


def load_profile(state_dir: str | Path, model: str, tp: int, device: str,
                 threads: int = 1) -> Profile | None:
    """The stored profile for the key, or None when none was measured (or the file is unreadable).
    Read from disk only when the file changed since the last call (a stat per call)."""
    path = profile_path(state_dir, model, tp, device, threads)
    try:
        st = path.stat()
    except OSError:
        _PROFILE_CACHE.pop(path, None)
        return None
    hit = _PROFILE_CACHE.get(path)
    stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    if hit is not None and hit[:3] == stamp:
        return hit[3]
    try:
        prof: Profile | None = Profile.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        prof = None
    if prof is not None and prof.threads != threads:
        prof = None
    _PROFILE_CACHE[path] = (*stamp, prof)
    return prof


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
