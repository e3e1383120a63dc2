"""Background profiling (`[scheduler] auto_profile = "idle"`): while nothing runs, the executor
profiles the shapes that have no profile, one at a time, and a batch arriving stops the run at
once. Driven by the manual clock with a test-double profiling run; the real run (a profile of a
tiny model, killed mid-way by a batch, then finished) is `test_a_real_profile_is_killed_then_made`."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from pathlib import Path

import pytest

from cli.serve import auto_profile_launch
from runtime.config import Config, ConfigError, load_config, parse_config
from runtime.engines.devices import discover_pool
from runtime.engines.procs import live_pids, tree_pids
from runtime.executor.autoprofile import IDLE_CHECK_S, ProfileProcess, Shape, missing_shapes
from runtime.executor.executor import PoolExecutor
from runtime.executor.planning import model_specs
from runtime.executor.latency_source import planner_shapes
from runtime.persist import load_profile, profile_path, profiles_dir, save_profile
from scheduler.latency import LatencyModel, Profile
from scheduler.types import DevicePool
from tools.profiler import profile_model

from .clocks import ManualClock
from .fakes import FakeLauncher
from .executor_kit import Sink, items

pytestmark = pytest.mark.timeout(60)
ARCH = {"num_layers": 2, "hidden_size": 128, "num_heads": 2, "num_kv_heads": 2,
        "intermediate_size": 512, "vocab_size": 2048}


def make_cfg(tmp_path: Path, models: tuple[str, ...] = ("a", "b"), **scheduler: object) -> Config:
    return parse_config({
        "server": {"state_dir": str(tmp_path / "state")},
        "devices": {"kind": "cpu", "cpu_kvcache_gib": 0.25, "engine_linger_s": 0},
        "scheduler": {"auto_profile": "idle", **scheduler},
        "models": [{"name": m, "path": f"/nonexistent/{m}", "max_model_len": 1024,
                    "max_num_seqs": 4, "max_num_batched_tokens": 1024, "arch": ARCH}
                   for m in models]})


def a_profile(shape: Shape, device: str = "cpu") -> Profile:
    return Profile(model=shape.model, tp=shape.tp, device=device, threads=shape.threads,
                   latency=LatencyModel(c0=1e-3, c1=1e-5, c2=0.0, c3=0.0, c4=0.0))


class FakeRun:
    """A profiling run that ends when the test says: `finish()` writes the profile as the profiler
    would (at its very end), `kill()` ends it without one."""

    def __init__(self, shape: Shape, state_dir: Path) -> None:
        self.shape, self.state_dir = shape, state_dir
        self.killed = False
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def kill(self) -> None:
        self.killed = True
        if not self._exit.done():
            self._exit.set_result(-9)

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)

    def finish(self, rc: int = 0) -> None:
        if rc == 0:
            save_profile(self.state_dir, a_profile(self.shape))
        self._exit.set_result(rc)


async def until(cond, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def shapes_of(runs: list) -> list[tuple[str, int, int]]:
    return [(r.shape.model, r.shape.tp, r.shape.threads) for r in runs]


async def started(cfg: Config, clock: ManualClock, launch, devices: int = 1) -> PoolExecutor:
    pool = DevicePool("cpu", tuple(range(devices)), 1 << 28)
    ex = PoolExecutor(cfg, FakeLauncher(), pool=pool, clock=clock, profile_launch=launch)
    await ex.start()
    if cfg.scheduler.auto_profile == "idle":
        await until(lambda: clock.sleeping == 1)  # its first idle check is due
    return ex


class Runs(list):
    """The test-double runs a profiler launched, in order; `launch` is its `ProfileLaunch`."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__()
        self.state_dir = state_dir

    async def launch(self, shape: Shape) -> FakeRun:
        self.append(FakeRun(shape, self.state_dir))
        return self[-1]


async def first_run(cfg: Config) -> tuple[PoolExecutor, ManualClock, Runs]:
    """An executor idle for two checks, its first profiling run just launched."""
    clock, runs = ManualClock(), Runs(cfg.state_dir)
    ex = await started(cfg, clock, runs.launch)
    await clock.advance(IDLE_CHECK_S)
    await clock.advance(IDLE_CHECK_S)
    await until(lambda: len(runs) == 1)
    return ex, clock, runs


def test_missing_shapes_are_the_planners_without_a_profile(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, ("a", "b", "plan-only"))
    cfg = dataclasses.replace(cfg, models=[*cfg.models[:2], dataclasses.replace(
        cfg.models[2], path=None)])
    pool = DevicePool("cpu", (0, 1), 1 << 28, max_threads=2)
    shapes = planner_shapes(model_specs(cfg, "cpu"), pool)
    assert ("a", 2, 1) in shapes and ("a", 1, 2) in shapes  # TP and threads on two cores
    save_profile(cfg.state_dir, a_profile(Shape("a", 1, 1, (0,))))
    missing = missing_shapes(cfg, pool, model_specs(cfg, "cpu"), cfg.state_dir)
    # one core per shape first (the base every other shape is derived from), then wider ones
    assert [(s.model, s.tp, s.threads) for s in missing] == [
        ("b", 1, 1), ("a", 1, 2), ("a", 2, 1), ("b", 1, 2), ("b", 2, 1)]
    assert [s.devices for s in missing] == [(0,), (0, 1), (0, 1), (0, 1), (0, 1)]
    # profiles are measured on CPU pools only
    assert missing_shapes(cfg, DevicePool("cuda", (0, 1), 1 << 34), model_specs(cfg, "cuda"),
                          cfg.state_dir) == []


def test_an_embedding_model_is_not_profiled(tmp_path: Path) -> None:
    """The profiler drives generation (/v1/completions): a pooling engine serves none of it."""
    cfg = make_cfg(tmp_path, ("a", "e"))
    embed = dataclasses.replace(cfg.models[1], engine_args={"runner": "pooling",
                                                            "convert": "embed"})
    cfg = dataclasses.replace(cfg, models=[cfg.models[0], embed])
    pool = DevicePool("cpu", (0,), 1 << 28)
    missing = missing_shapes(cfg, pool, model_specs(cfg, "cpu"), cfg.state_dir)
    assert [s.model for s in missing] == ["a"]
    with pytest.raises(ConfigError, match=r"models\[e\]: .*/v1/embeddings"):
        profile_model(cfg, "e")


async def test_idle_profiles_each_missing_shape_and_a_batch_stops_it_at_once(tmp_path) -> None:
    cfg = make_cfg(tmp_path)
    clock, runs = ManualClock(), Runs(cfg.state_dir)
    ex = await started(cfg, clock, runs.launch)
    try:
        assert ex.health()["auto_profile"] == {"state": "waiting", "missing": 2}
        await clock.advance(IDLE_CHECK_S)
        assert runs == []  # idle at one check only: a client may be about to upload
        await clock.advance(IDLE_CHECK_S)
        await until(lambda: len(runs) == 1)
        assert shapes_of(runs) == [("a", 1, 1)]
        health = ex.health()["auto_profile"]
        assert health["state"] == "profiling" and health["shape"] == {
            "model": "a", "tp": 1, "threads": 1, "devices": [0]}

        ex.submit("b1", items("a", 3), sink := Sink())
        assert runs[0].killed  # at once, before the executor even awaited anything
        assert ex.health()["auto_profile"]["state"] == "waiting"
        await clock.advance(2)  # past the arrival pause
        await asyncio.wait_for(ex.wait("b1"), 30)
        assert len(sink.by_id()) == 3
        assert load_profile(cfg.state_dir, "a", 1, "cpu") is None  # nothing saved

        # idle again (the engine stopped: no linger): the stopped shape is tried again
        await clock.advance(IDLE_CHECK_S)
        await clock.advance(IDLE_CHECK_S)
        await until(lambda: len(runs) == 2)
        assert shapes_of(runs) == [("a", 1, 1)] * 2
        runs[1].finish()
        await until(lambda: len(runs) == 3)  # still idle: the next shape right away
        assert shapes_of(runs)[2] == ("b", 1, 1)
        assert load_profile(cfg.state_dir, "a", 1, "cpu") is not None

        ex.gateway_batches(1)  # a batch created, validating: it has not reached us yet
        assert runs[2].killed
        await clock.advance(3 * IDLE_CHECK_S)
        assert len(runs) == 3  # not while the gateway has a live batch
        ex.gateway_batches(0)
        await clock.advance(IDLE_CHECK_S)
        await clock.advance(IDLE_CHECK_S)
        await until(lambda: len(runs) == 4)
        runs[3].finish()
        await until(lambda: ex.health()["auto_profile"]["state"] == "done")
        await clock.advance(3 * IDLE_CHECK_S)
        assert len(runs) == 4 and ex.health()["auto_profile"] == {"state": "done", "missing": 0}
        kinds = [(e["event"], e["shape"]["model"]) for e in ex.auto_profile.events]
        assert kinds == [("auto_profile_started", "a"), ("auto_profile_stopped", "a"),
                         ("auto_profile_started", "a"), ("auto_profile_done", "a"),
                         ("auto_profile_started", "b"), ("auto_profile_stopped", "b"),
                         ("auto_profile_started", "b"), ("auto_profile_done", "b")]
    finally:
        await ex.close()


async def test_a_failed_shape_is_not_retried_and_off_profiles_nothing(tmp_path) -> None:
    ex, _, runs = await first_run(make_cfg(tmp_path))
    try:
        runs[0].finish(rc=1)  # e.g. the weights are not there
        await until(lambda: len(runs) == 2)
        runs[1].finish()
        await until(lambda: ex.health()["auto_profile"]["state"] == "done")
        assert ex.health()["auto_profile"] == {"state": "done", "missing": 1, "failed": 1}
        assert shapes_of(runs) == [("a", 1, 1), ("b", 1, 1)]
    finally:
        await ex.close()
    off = await started(make_cfg(tmp_path, auto_profile="off"), ManualClock(), runs.launch)
    try:
        assert "auto_profile" not in off.health() and off.auto_profile is None
    finally:
        await off.close()


async def test_close_kills_a_run_in_progress(tmp_path) -> None:
    ex, _, runs = await first_run(make_cfg(tmp_path))
    await asyncio.wait_for(ex.close(), 5)
    assert runs[0].killed


def tiny_config(tmp_path: Path, model_dir: Path) -> Path:
    path = tmp_path / "samullm.toml"
    path.write_text(f"""
[server]
state_dir = "{tmp_path / 'state'}"
[devices]
kind = "cpu"
ids = [{min(os.sched_getaffinity(0))}]
cpu_kvcache_gib = 0.25
engine_linger_s = 0
[scheduler]
auto_profile = "idle"
[[models]]
name = "tiny-a"
path = "{model_dir / 'tiny-a'}"
dtype = "float32"
max_model_len = 1024
max_num_seqs = 32
max_num_batched_tokens = 1024
engine_args = {{ enforce_eager = true }}
""")
    return path


@pytest.mark.engine
@pytest.mark.timeout(480)  # ~35 s on an idle machine; at nice 19 a loaded one starves it
async def test_a_real_profile_is_killed_then_made(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`samullm profile` of tiny-a as `samullm serve` runs it (the sweep alone, `--no-start-time
    --repeats 1`, to keep this test near 30 s here): a batch arriving mid-sweep kills the whole
    process tree (the profiler and its sweep worker, in a session of its own) at once and leaves no
    profile and no temp file; at the next idle time the shape is profiled to the end and the
    planner's reader finds it."""
    config = tiny_config(tmp_path, tiny_model_dir)
    cfg = load_config(config)
    launch = auto_profile_launch(config, cfg, ("--quick", "--no-start-time", "--repeats", "1"))
    clock = ManualClock()
    pool = discover_pool(cfg)
    ex = PoolExecutor(cfg, FakeLauncher(), pool=pool, clock=clock, profile_launch=launch)
    await ex.start()
    try:
        await until(lambda: clock.sleeping == 1)
        await clock.advance(IDLE_CHECK_S)
        await clock.advance(IDLE_CHECK_S)
        await until(lambda: ex.health()["auto_profile"]["state"] == "profiling")
        run = ex.auto_profile.run
        assert isinstance(run, ProfileProcess)
        # until the sweep worker runs (a session of its own, under the profiler)
        await until(lambda: len(tree_pids(run.pid)) >= 2, 60)
        tree = tree_pids(run.pid)
        assert all(os.getpriority(os.PRIO_PROCESS, p) == 19 for p in tree)
        t0 = time.monotonic()
        ex.submit("b1", items("tiny-a", 2), Sink())
        await until(lambda: not live_pids(tree), 5)
        assert time.monotonic() - t0 < 2.0, "the profiling tree outlived the batch's arrival"
        assert [e["event"] for e in ex.auto_profile.events] == ["auto_profile_started",
                                                                "auto_profile_stopped"]
        await clock.advance(2)
        await asyncio.wait_for(ex.wait("b1"), 30)
        assert not [p.name for p in profiles_dir(cfg.state_dir).glob("*") if p.is_file()]

        await clock.advance(IDLE_CHECK_S)
        await clock.advance(IDLE_CHECK_S)
        await until(lambda: ex.health()["auto_profile"]["state"] == "done", 400)
        assert [e["event"] for e in ex.auto_profile.events][2:] == ["auto_profile_started",
                                                                    "auto_profile_done"]
        prof = load_profile(cfg.state_dir, "tiny-a", 1, pool.signature)
        assert prof is not None and prof.latency.c0 > 0
        assert profile_path(cfg.state_dir, "tiny-a", 1, pool.signature).exists()
        assert not live_pids(tree_pids(run.pid))
    finally:
        await ex.close()
