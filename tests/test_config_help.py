"""Config help: every field documented, and `samullm serve --help-config` prints all of it as TOML."""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing

import pytest

from cli.main import main
from runtime import config as config_mod, config_help
from runtime.config import Config, parse_config
from runtime.config_help import annotated_config

CONFIG_CLASSES = [c for c in vars(config_mod).values()
                  if dataclasses.is_dataclass(c) and c.__module__ == config_mod.__name__]


def _fields(cls: type) -> list[tuple[type, dataclasses.Field]]:
    return [(cls, f) for f in dataclasses.fields(cls)]


def _uncommented(text: str) -> str:
    """The text with every `#key = ...` and `#[table]` line switched on (help lines are `# ...`)."""
    return re.sub(r"^#(?=[A-Za-z\[])", "", text, flags=re.M)


def _keys(cls: type, data: dict, prefix: str = "") -> set[str]:
    """Dotted keys of `data` that are fields of `cls` (recursing into tables), asserting no others."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    keys = set()
    for key, value in data.items():
        assert key in names, f"{prefix}{key} is printed but is not a field of {cls.__name__}"
        keys.add(prefix + key)
        item = config_help._dataclass_in(hints[key])
        for table in (value if isinstance(value, list) else [value]) if item else ():
            keys |= _keys(item, table, f"{prefix}{key}.")
    return keys


def _all_keys(cls: type, prefix: str = "") -> set[str]:
    hints = typing.get_type_hints(cls)
    keys = set()
    for f in dataclasses.fields(cls):
        if f.name == "base_dir":  # set by the loader, not a TOML key
            continue
        keys.add(prefix + f.name)
        item = config_help._dataclass_in(hints[f.name])
        if item is not None:
            keys |= _all_keys(item, f"{prefix}{f.name}.")
    return keys


@pytest.mark.parametrize("cls,f", [cf for c in CONFIG_CLASSES for cf in _fields(c)],
                         ids=lambda v: getattr(v, "name", getattr(v, "__name__", "")))
def test_every_field_has_help(cls: type, f: dataclasses.Field) -> None:
    assert f.metadata.get("help", "").strip(), f"{cls.__name__}.{f.name} has no help"
    table = config_help._dataclass_in(typing.get_type_hints(cls)[f.name])
    if table is None and (f.default is None or (f.default is dataclasses.MISSING
                                                and f.default_factory is dataclasses.MISSING)):
        assert "example" in f.metadata, f"{cls.__name__}.{f.name} has no default and no example"


def test_annotated_config_parses_to_the_defaults() -> None:
    text = annotated_config()
    assert all(len(line) <= 100 for line in text.splitlines())
    assert parse_config(tomllib.loads(text)) == Config()


def test_annotated_config_prints_every_field_and_nothing_else() -> None:
    data = tomllib.loads(_uncommented(annotated_config()))
    assert _keys(Config, data) == _all_keys(Config)
    cfg = parse_config(data)  # the examples make a complete, valid config
    assert [m.name for m in cfg.models] == ["tiny"] and cfg.models[0].arch is not None


def test_strategy_help_names_every_strategy() -> None:
    from scheduler.planner import STRATEGIES

    help_text = next(f for f in dataclasses.fields(config_mod.SchedulerConfig)
                     if f.name == "strategy").metadata["help"]
    assert config_mod.STRATEGIES is STRATEGIES
    assert all(s in help_text for s in STRATEGIES)


def test_serve_help_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--help-config"]) == 0
    out = capsys.readouterr().out
    limits = out.split("[limits]\n", 1)[1].split("\n[", 1)[0]
    assert re.search(r"^max_line_bytes = 16777216$", limits, re.M)
    assert out == annotated_config()
