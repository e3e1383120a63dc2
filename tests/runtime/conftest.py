"""Fixtures for the executor's tests: the test-double launcher, and `run`, which starts executors
on it and, on teardown, checks that no device was ever given to two live engines, that no engine
is left running and that every engine's process group was reaped."""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import pytest_asyncio

from runtime.config import Config
from runtime.executor.executor import PoolExecutor
from scheduler.types import DevicePool

from .clocks import ManualClock
from .executor_kit import make_cfg
from .fakes import FakeLauncher


@pytest.fixture
def launcher() -> FakeLauncher:
    return FakeLauncher(delay_s={"a": 0.01, "b": 0.02, "c": 0.03})


@pytest_asyncio.fixture(loop_scope="function")
async def run(tmp_path: Path, launcher: FakeLauncher) -> AsyncIterator[Any]:
    made: list[PoolExecutor] = []

    async def factory(cfg: Config | None = None, devices: int = 4,
                      clock: ManualClock | None = None) -> PoolExecutor:
        cfg = cfg or make_cfg(tmp_path)
        pool = DevicePool("cpu", tuple(range(devices)), int(cfg.devices.cpu_kvcache_gib * 2**30))
        # the executor's own waits (arrival pause, storage backoff) take no real time
        ex = PoolExecutor(cfg, launcher, pool=pool, clock=clock or ManualClock(auto=True))
        await ex.start()
        made.append(ex)
        return ex

    yield factory
    for ex in made:
        await ex.close()
    assert launcher.overlaps == [], "a device was given to two live engines"
    assert launcher.alive() == [], "engines left running after close()"
