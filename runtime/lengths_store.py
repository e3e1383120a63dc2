"""The learned output-length model, persisted under the state dir so it survives restarts.

`<state_dir>/lengths.json` holds `LengthModel.to_dict()`. It is written atomically (temp file, fsync,
rename) at each re-plan: a crash leaves the previous version, never a torn file. A missing or unreadable
file gives the shipped prior (the model learns again from the next finished requests).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from runtime.atomic import write_json_atomic
from scheduler.lengths import LengthModel

log = logging.getLogger(__name__)
FILENAME = "lengths.json"


def load_length_model(state_dir: Path) -> LengthModel:
    path = Path(state_dir) / FILENAME
    try:
        return LengthModel.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return LengthModel()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable length model %s (%s); starting from the prior", path, exc)
        return LengthModel()


def save_length_model(state_dir: Path, model: LengthModel) -> Path:
    return write_json_atomic(Path(state_dir) / FILENAME, model.to_dict())
