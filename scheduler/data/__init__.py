"""Immutable tables shipped with the package, each derived from `../shared/data` by a script in
`bench/` that the table names. Reading these packaged files (once, cached) is the only file access
in `scheduler/`; everything else the scheduler learns is passed in by the runtime."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any


@functools.cache
def load_json(name: str) -> Any:
    """The parsed packaged table `scheduler/data/<name>` (do not mutate the result)."""
    return json.loads((resources.files(__package__) / name).read_text())
