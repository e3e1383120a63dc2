"""Config loading: errors name the offending key; the shipped default loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent

MODEL = '[[models]]\nname = "m"\npath = "x"\n'


def _load(tmp_path: Path, text: str):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return load_config(p)


def test_default_config_loads():
    cfg = load_config(REPO / "conf" / "default.toml")
    assert len(cfg.models) >= 3
    assert len({m.name for m in cfg.models}) == len(cfg.models)


def test_missing_file_is_reported(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_unknown_key_is_named(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"models\[0\]\.max_seqs: unknown key"):
        _load(tmp_path, MODEL + "max_seqs = 3\n")
    with pytest.raises(ConfigError, match=r"config\.srever: unknown key"):
        _load(tmp_path, "[srever]\nport = 1\n")


def test_bad_type_is_named(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"models\[0\]\.max_num_seqs: expected int, got str"):
        _load(tmp_path, MODEL + 'max_num_seqs = "64"\n')
    with pytest.raises(ConfigError, match=r"server\.port: expected int, got bool"):
        _load(tmp_path, "[server]\nport = true\n")


def test_bad_value_is_named(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"models\[0\]\.max_model_len: must be positive"):
        _load(tmp_path, MODEL + "max_model_len = 0\n")
    with pytest.raises(ConfigError, match=r"devices\.kind"):
        _load(tmp_path, '[devices]\nkind = "tpu"\n')
    with pytest.raises(ConfigError, match=r"models\[1\]\.name: duplicate"):
        _load(tmp_path, MODEL + MODEL)


def test_invalid_toml_is_reported(tmp_path: Path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        _load(tmp_path, "[server\n")


def test_start_contention_sets_the_pool_and_bad_values_are_named(tmp_path: Path):
    from runtime.engines.devices import start_contention
    from scheduler.types import default_start_contention

    assert _load(tmp_path, "[devices]\nstart_contention = 0\n").devices.start_contention == 0.0
    cfg = _load(tmp_path, "[devices]\nstart_contention = 0.4\n")
    assert start_contention(cfg, "cpu") == start_contention(cfg, "a100") == 0.4
    unset = _load(tmp_path, "[devices]\n")
    assert start_contention(unset, "cpu") == default_start_contention("cpu")
    assert start_contention(unset, "h100") == default_start_contention("h100")
    with pytest.raises(ConfigError, match=r"devices\.start_contention: must be a number in \[0"):
        _load(tmp_path, "[devices]\nstart_contention = -0.5\n")
    with pytest.raises(ConfigError, match=r"devices\.start_contention: expected float, got str"):
        _load(tmp_path, '[devices]\nstart_contention = "high"\n')


def test_max_threads_per_rank_sets_cpu_pools(tmp_path: Path):
    import os

    from runtime.engines.devices import discover_pool

    cores = len(os.sched_getaffinity(0))
    assert discover_pool(_load(tmp_path, '[devices]\nkind = "cpu"\n')).max_threads == cores
    one = _load(tmp_path, '[devices]\nkind = "cpu"\nmax_threads_per_rank = 1\n')
    assert discover_pool(one).max_threads == 1
    with pytest.raises(ConfigError, match=r"devices\.max_threads_per_rank: must be >= 0"):
        _load(tmp_path, "[devices]\nmax_threads_per_rank = -1\n")


def test_engine_nice_defaults_per_device_kind_and_is_checked(tmp_path: Path):
    unset = _load(tmp_path, "[devices]\n").devices
    assert unset.effective_engine_nice("cpu") == 5 and unset.effective_engine_nice("cuda") == 0
    assert _load(tmp_path, "[devices]\nengine_nice = 0\n").devices.effective_engine_nice("cpu") == 0
    assert _load(tmp_path, "[devices]\nengine_nice = 12\n").devices.effective_engine_nice("a100") == 12
    with pytest.raises(ConfigError, match=r"devices\.engine_nice: an integer in \[0, 19\]"):
        _load(tmp_path, "[devices]\nengine_nice = 40\n")


def test_spare_engines_default_per_device_kind_and_is_checked(tmp_path: Path):
    unset = _load(tmp_path, "").devices
    assert unset.effective_spare_engines("cpu", 2) == 3 and unset.effective_spare_engines("cpu", 1) == 2
    assert unset.effective_spare_engines("cpu", 16) == 3
    assert unset.effective_spare_engines("a100", 8) == 0  # GPUs: never (untested there)
    assert _load(tmp_path, "[devices]\nspare_engines = 0\n").devices.effective_spare_engines(
        "cpu", 2) == 0
    with pytest.raises(ConfigError, match=r"devices\.spare_engines: an integer in \[0, 64\]"):
        _load(tmp_path, "[devices]\nspare_engines = -1\n")


def test_batch_slack_reaches_the_planning_problem_and_is_checked(tmp_path: Path):
    from runtime.executor.latency_source import LatencySource
    from runtime.executor.planning import build_problem
    from scheduler.types import DevicePool

    assert _load(tmp_path, "").scheduler.batch_slack == 0.02
    cfg = _load(tmp_path, MODEL + "[scheduler]\nbatch_slack = 0.1\n")
    pool = DevicePool("cpu", (0,), 1 << 30)
    latency = LatencySource.load(tmp_path, pool, [], {})
    problem = build_problem(cfg, pool, {}, latency, {}, {}, seed=0)
    assert problem.batch_slack == 0.1
    with pytest.raises(ConfigError, match=r"scheduler\.batch_slack: a share in \[0, 1\]"):
        _load(tmp_path, "[scheduler]\nbatch_slack = 1.5\n")
