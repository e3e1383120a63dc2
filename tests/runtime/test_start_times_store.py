"""Persisted engine start times: round trip, bad files, smoothing."""

from __future__ import annotations

from pathlib import Path

from runtime.persist import START_TIMES_FILE as FILENAME, blend, load_start_times, save_start_times


def test_round_trip_keeps_model_names_with_separators(tmp_path: Path) -> None:
    times = {("tiny-a", 1, 1): 21.5, ("org/model|x", 2, 1): 40.25, ("tiny-a", 1, 2): 14.0}
    save_start_times(tmp_path, times)
    assert load_start_times(tmp_path) == times


def test_a_file_from_before_threads_were_kept_reads_as_one_core_per_rank(tmp_path: Path) -> None:
    (tmp_path / FILENAME).write_text('{"a|1": 3.0, "a|2": 4.0, "a|1x2": 14.0}')
    assert load_start_times(tmp_path) == {("a", 1, 1): 3.0, ("a", 2, 1): 4.0, ("a", 1, 2): 14.0}


def test_missing_or_unreadable_file_gives_nothing(tmp_path: Path) -> None:
    assert load_start_times(tmp_path) == {}
    (tmp_path / FILENAME).write_text("{not json")
    assert load_start_times(tmp_path) == {}
    (tmp_path / FILENAME).write_text('["a list"]')
    assert load_start_times(tmp_path) == {}


def test_non_positive_entries_are_ignored(tmp_path: Path) -> None:
    (tmp_path / FILENAME).write_text('{"a|1": 0, "b|2": 12.5}')
    assert load_start_times(tmp_path) == {("b", 2, 1): 12.5}


def test_blend_moves_halfway() -> None:
    assert blend(None, 30.0) == 30.0
    assert blend(20.0, 40.0) == 30.0


async def test_executor_plans_with_start_times_measured_before_a_restart(tmp_path: Path) -> None:
    """A restarted executor's first plan uses the engine start time the previous one measured,
    not the profile's or the default."""
    import asyncio

    from runtime.executor.executor import PoolExecutor
    from runtime.executor.latency_source import DEFAULT_CPU_LOAD_S, DEFAULT_CPU_TP_COLD_S
    from scheduler.planner import plan
    from scheduler.types import DevicePool

    from .fakes import FakeLauncher
    from .executor_kit import Sink, items, make_cfg

    cfg = make_cfg(tmp_path)
    pool = DevicePool("cpu", (0, 1), int(cfg.devices.cpu_kvcache_gib * 2**30))
    seen: list[dict[int, float]] = []  # per plan: tp -> load time the planner was given for "a"

    def recording(problem, strategy):
        spec = problem.models["a"]
        seen.append({tp: problem.latency(spec, tp).load_time_s for tp in (1, 2)})
        return plan(problem, strategy)

    launcher = FakeLauncher(start_delay_s=0.3, delay_s={"a": 0.001})
    for run in range(2):
        ex = PoolExecutor(cfg, launcher, planner=recording, pool=pool)
        await ex.start()
        try:
            ex.submit(f"b{run}", items("a", 2, prefix=f"r{run}"), Sink())
            await asyncio.wait_for(ex.wait(f"b{run}"), 30)
        finally:
            await ex.close()
        if run == 0:
            # nothing measured (a TP-2 engine also pays its first requests)
            assert seen[0] == {1: DEFAULT_CPU_LOAD_S, 2: DEFAULT_CPU_LOAD_S + DEFAULT_CPU_TP_COLD_S}
            measured = load_start_times(tmp_path / "state")
            assert len(measured) == 1
            (key, start_s), = measured.items()
            assert key[0] == "a" and 0.3 <= start_s < 5
            plans_before = len(seen)
    # the restarted executor's first plan already knows the start time measured before
    assert seen[plans_before][key[1]] == start_s


def test_alone_start_round_trips_through_the_contention_factor() -> None:
    from scheduler.types import DevicePool

    from runtime.persist import alone_start_s

    pool = DevicePool("cpu", (0, 1, 2), 1 << 30, start_contention=0.25)
    for n, measured in ((1, 30.0), (2, 37.5), (3, 45.0)):
        alone = alone_start_s(measured, pool.start_factor(n))
        assert alone == 30.0
        assert alone * pool.start_factor(n) == measured  # what the planner charges n starts again


async def test_executor_stores_concurrent_starts_as_alone_starts(tmp_path: Path) -> None:
    """Two replicas started by one pass: each measured start is divided by 1 + β·(2 − 1) before
    it is stored, so the planner (which multiplies it in again) predicts what was measured."""
    from scheduler.types import DevicePool, ExecPlan, Schedule, Stage

    from .fakes import FakeLauncher
    from .executor_kit import items, make_cfg, run_once

    cfg = make_cfg(tmp_path)
    pool = DevicePool("cpu", (0, 1), int(cfg.devices.cpu_kvcache_gib * 2**30), start_contention=0.5)

    def two_replicas(problem, strategy):
        return Schedule(strategy, [Stage([ExecPlan("a", 1, 2, (0, 1))], 0.0, 1.0, ["a"])], 1.0)

    launcher = FakeLauncher(start_delay_s=0.3, delay_s={"a": 0.001})
    ex = await run_once(cfg, launcher, pool, items("a", 4), planner=two_replicas)
    started = [e for e in ex.events("b") if e["event"] == "engine_started"]
    assert len(started) == 2 and all(e["starting_with"] == 2 for e in started)
    assert all(e["alone_start_s"] == e["start_s"] / 1.5 for e in started)
    assert load_start_times(tmp_path / "state") == {("a", 1, 1): round(0.3 / 1.5, 3)}


async def test_the_executor_rewrites_learned_state_only_when_it_changed(tmp_path: Path) -> None:
    """A planning pass that learned nothing writes no file (no rewrite, no fsync per pass)."""
    from runtime.executor.executor import PoolExecutor
    from runtime.persist import LENGTHS_FILE

    from .fakes import FakeLauncher
    from .executor_kit import make_cfg
    cfg = make_cfg(tmp_path)
    ex = PoolExecutor(cfg, FakeLauncher())
    state = cfg.state_dir
    state.mkdir(parents=True, exist_ok=True)
    await ex.learned.save()
    assert not (state / LENGTHS_FILE).exists() and not (state / FILENAME).exists()
    ex.learned.start_times[("a", 1, 1)] = 12.0
    await ex.learned.save()
    assert load_start_times(state) == {("a", 1, 1): 12.0}
    (state / FILENAME).unlink()
    (state / LENGTHS_FILE).unlink()
    await ex.learned.save()  # nothing new since: not written again
    assert not (state / FILENAME).exists() and not (state / LENGTHS_FILE).exists()
    ex.learned.lengths.observe("a", "/v1/chat/completions", 7, False)
    await ex.learned.save()
    assert (state / LENGTHS_FILE).exists()
