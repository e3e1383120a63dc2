"""The annotated config (`samullm serve --help-config`): every table and key of `runtime.config`
as TOML, each key at its default after its help text, read off the dataclasses' field metadata."""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
import typing
from typing import Any

from runtime.config import Config

HELP_WIDTH = 100
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def annotated_config() -> str:
    """Every table and key of the config file as TOML, each key at its default after its help.

    A key without a default (required in its table, or unset = None) is written commented out as
    `#key = <example>`, as is every line of a table that is absent by default (`[[models]]`); help
    lines start with `# `. So the uncommented text parses to the default config, and uncommenting
    every `#key`/`#[table]` line gives a complete one with one example model."""
    lines = ["# samullm configuration: every key at its default (`samullm serve --help-config`).",
             "# `#key = value` lines are unset by default or required in their table, and show an example."]
    _emit_table(Config, "", False, lines)
    return "\n".join(lines) + "\n"


def _emit_table(cls: type, prefix: str, commented: bool, out: list[str]) -> None:
    """`cls`'s keys, then its sub-tables; TOML needs a table's own keys before its sub-tables."""
    hints = typing.get_type_hints(cls)
    subtables: list[tuple[dataclasses.Field, type, bool]] = []
    for f in dataclasses.fields(cls):
        if f.name == "base_dir":
            continue
        tp = hints[f.name]
        item = _dataclass_in(tp)
        if item is not None:
            subtables.append((f, item, typing.get_origin(tp) is list))
            continue
        value, unset = _shown_value(f)
        out += _help_lines(f)
        out.append(f"{'#' if commented or unset else ''}{f.name} = {_toml_value(value)}")
    # arrays of tables last, as in conf/default.toml: the sections read first, the models after
    for f, item, array in sorted(subtables, key=lambda t: t[2]):
        name = f"{prefix}{f.name}"
        # an array's default is empty and an optional table's is None: both are absent by default
        absent = commented or array or f.default is None
        out += ["", *_help_lines(f)]
        out.append(("#" if absent else "") + (f"[[{name}]]" if array else f"[{name}]"))
        _emit_table(item, f"{name}.", absent, out)


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass a field holds (`X`, `X | None` or `list[X]`), else None."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return args[0] if dataclasses.is_dataclass(args[0]) else None


def _shown_value(f: dataclasses.Field) -> tuple[Any, bool]:
    """(value to print, whether it is an example that stays commented out)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory(), False
    if f.default is dataclasses.MISSING or f.default is None:
        return f.metadata["example"], True
    return f.default, False


def _help_lines(f: dataclasses.Field) -> list[str]:
    text = f.metadata["help"]
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        text += "; required"
    return textwrap.wrap(text, HELP_WIDTH - 2, initial_indent="# ", subsequent_indent="# ",
                         break_on_hyphens=False)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(map(_toml_value, v)) + "]"
    if isinstance(v, dict):
        items = [f"{k if _BARE_KEY.fullmatch(k) else json.dumps(k)} = {_toml_value(x)}"
                 for k, x in v.items()]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    raise TypeError(f"no TOML form for {v!r}")
