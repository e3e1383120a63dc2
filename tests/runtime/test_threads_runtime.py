"""CPU ranks on several cores in the runtime: bind strings, profile keys, latencies, executor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.engines.engine import EngineSpec, build_command, cpu_bind_string
from runtime.persist import load_profile, load_profiles, profile_path, save_profile
from runtime.executor.planning import describe_stage, running_plans, stage_replicas
from runtime.executor.latency_source import DEFAULT_CPU_SPAWN_LOAD_S, LatencySource
from scheduler.latency import LatencyModel, Profile, assumed_threads_latency
from scheduler.types import DevicePool, ExecPlan, ModelSpec, Schedule, Stage

from .fakes import FakeLauncher
from .executor_kit import items, make_cfg, run_once

GiB = 1 << 30
LAT = LatencyModel(0.01, 1e-4, 1e-7, 1e-7, 1e-5, load_time_s=20.0)


def test_bind_strings_give_each_rank_its_cores() -> None:
    assert cpu_bind_string((0,), 1) == "0"
    assert cpu_bind_string((0, 1), 1) == "0-1"  # TP=1 on both cores
    assert cpu_bind_string((0, 1), 2) == "0|1"
    assert cpu_bind_string((0, 1, 2, 3), 2) == "0-1|2-3"  # TP=2, two cores per rank
    with pytest.raises(ValueError):
        cpu_bind_string((0, 1, 2), 2)


def test_profile_key_round_trip_and_old_files_load_as_one_thread(tmp_path: Path) -> None:
    one = Profile("m", 1, "cpu", LAT)
    two = Profile("m", 1, "cpu", LAT.with_load_time(21.0), threads=2)
    save_profile(tmp_path, one)
    path = save_profile(tmp_path, two)
    assert path == profile_path(tmp_path, "m", 1, "cpu", 2) != profile_path(tmp_path, "m", 1, "cpu")
    assert load_profile(tmp_path, "m", 1, "cpu") == one
    assert load_profile(tmp_path, "m", 1, "cpu", 2) == two
    assert load_profiles(tmp_path) == {("m", 1, "cpu"): one, ("m", 1, "cpu", 2): two}
    # a profile file written before threads existed (no "threads" field) is the threads = 1 one
    old = {"model": "o", "tp": 2, "device": "cpu", "latency": LAT.to_dict(), "meta": {}}
    profile_path(tmp_path, "o", 2, "cpu").write_text(json.dumps(old))
    assert load_profile(tmp_path, "o", 2, "cpu") == Profile("o", 2, "cpu", LAT)


def test_latency_source_uses_the_threads_profile_else_the_assumption(tmp_path: Path) -> None:
    spec = ModelSpec("m", 2, 128, 2, 1, 512, 2048, dtype_bytes=4)
    fast = LatencyModel(0.005, 5e-5, 1e-7, 1e-7, 1e-5, load_time_s=99.0)
    save_profile(tmp_path, Profile("m", 1, "cpu", LAT))
    save_profile(tmp_path, Profile("m", 1, "cpu", fast, threads=2))
    pool = DevicePool("cpu", (0, 1), GiB, max_threads=2)
    src = LatencySource.load(tmp_path, pool, ["m"], {("m", 1, 2): 30.0})
    assert src.threads(spec, 1, 2) == fast.with_load_time(30.0)  # the measured start time wins
    # the shape's own start: one core per rank forks its engine processes, two cores spawn them
    src = LatencySource.load(tmp_path, pool, ["m"], {("m", 1, 1): 3.0})
    assert src.threads(spec, 1, 2) == fast
    save_profile(tmp_path / "none", Profile("m", 1, "cpu", LAT))
    src = LatencySource.load(tmp_path / "none", pool, ["m"], {})
    assert src.threads(spec, 1, 2) == assumed_threads_latency(LAT, spec, 1, 2).with_load_time(
        DEFAULT_CPU_SPAWN_LOAD_S)


def test_replicas_and_running_plans_keep_threads() -> None:
    stage = Stage([ExecPlan("a", 1, 1, (0, 1), threads=2), ExecPlan("b", 1, 2, (2, 3))], 0, 1)
    keys = list(stage_replicas(stage))
    assert keys == [("a", 1, (0, 1)), ("b", 1, (2,)), ("b", 1, (3,))]
    assert running_plans(keys) == {"a": ExecPlan("a", 1, 1, (0, 1), threads=2),
                                   "b": ExecPlan("b", 1, 2, (2, 3))}
    assert describe_stage(stage)[0]["threads"] == 2 and "threads" not in describe_stage(stage)[1]


async def test_executor_launches_one_engine_on_both_cores(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    pool = DevicePool("cpu", (0, 1), int(cfg.devices.cpu_kvcache_gib * GiB), max_threads=2)

    def threads_plan(problem, strategy):
        plan = ExecPlan("a", 1, 1, (0, 1), threads=2)
        return Schedule(strategy, [Stage([plan], 0.0, 1.0, ["a"])], 1.0)

    launcher = FakeLauncher(start_delay_s=0.05, delay_s={"a": 0.001})
    ex = await run_once(cfg, launcher, pool, items("a", 6), planner=threads_plan)
    (engine,) = launcher.engines
    spec: EngineSpec = engine.spec
    assert (spec.tp, spec.devices) == (1, (0, 1)) and not launcher.overlaps
    _, env = build_command(spec, port=1)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    events = ex.events("b")
    started = next(e for e in events if e["event"] == "engine_started")
    assert started["threads"] == 2 and started["devices"] == [0, 1]
    assert next(e for e in events if e["event"] == "plan")["stage"][0]["threads"] == 2


def test_a_profile_is_parsed_again_only_when_its_file_changed(tmp_path: Path, monkeypatch) -> None:
    """Every planning pass asks for every profile: unchanged files are not read again."""
    import runtime.persist as persist
    parsed = []
    real = persist.Profile.from_dict
    monkeypatch.setattr(persist.Profile, "from_dict",
                        staticmethod(lambda d: parsed.append(1) or real(d)))
    one = Profile("m", 1, "cpu", LAT)
    save_profile(tmp_path, one)
    assert [load_profile(tmp_path, "m", 1, "cpu") for _ in range(5)] == [one] * 5
    assert len(parsed) == 1
    two = Profile("m", 1, "cpu", LAT.with_load_time(33.0))
    save_profile(tmp_path, two)  # the profiler measured again
    assert load_profile(tmp_path, "m", 1, "cpu") == two and len(parsed) == 2
    profile_path(tmp_path, "m", 1, "cpu").unlink()
    assert load_profile(tmp_path, "m", 1, "cpu") is None
