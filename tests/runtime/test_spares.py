"""The spare pool's bookkeeping, with a stand-in zygote (`tests.runtime.spare_double`: the real
forking and guarding, no vLLM); the real spare turning into a real engine is tested in
tests/test_engine.py."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from runtime.engines.api_server import ENGINE_MAIN
from runtime.engines.procs import group_pids
from runtime.engines.spare_child import SPARE_NICE
from runtime.engines.spares import SparePool

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pool(tmp_path, size: int, **env: str) -> SparePool:
    return SparePool(size, tmp_path / "logs",
                     lambda: {**os.environ, "PYTHONPATH": REPO, **env},
                     python=sys.executable, module="tests.runtime.spare_double")


async def test_spares_are_forked_from_one_zygote_and_refilled_at_once(tmp_path) -> None:
    """Nothing is handed out while the zygote imports; then every spare is a fork of it, ready at
    once, at the spares' niceness, in a session and group of its own; a taken one becomes the
    command it is given, and the pool is full again right away."""
    pool = _pool(tmp_path, 2, SPARE_DOUBLE_DELAY="0.5")
    await pool.start()
    try:
        assert pool.take() is None and not pool.forks_ready()  # the zygote still "imports"
        assert await pool.wait_ready(20) == 2 and pool.forks_ready()
        a, b = pool.take(), pool.take()
        assert a is not None and b is not None and a.pid != b.pid and pool.take() is None
        assert pool.zygote is not None
        for spare in (a, b):
            assert os.getpgid(spare.pid) == os.getsid(spare.pid) == spare.pid  # its own group
            assert os.getpriority(os.PRIO_PROCESS, spare.pid) == min(19, os.getpriority(
                os.PRIO_PROCESS, 0) + SPARE_NICE)  # waits on idle CPU only
        log = tmp_path / "engine.log"
        proc = await a.adopt(["x", "-m", ENGINE_MAIN, "--port", "1"], dict(os.environ), (), 19, log)
        assert proc.pid == a.pid
        for _ in range(100):
            if log.exists() and log.read_text():
                break
            await asyncio.sleep(0.05)
        got = json.loads(log.read_text())
        assert got["argv"] == ["--port", "1"] and got["pid"] in group_pids(a.pid)
        pool.refill()
        assert await pool.wait_ready(5) == 2  # both taken ones replaced: forks, no import
        await b.stop()
        assert b.returncode is not None and not group_pids(b.pid)
        os.killpg(a.pid, 9)
        assert await asyncio.wait_for(a.wait(), 10) == -9  # the zygote reports its exit
        spare_pids = [s.pid for s in pool._spares]
        zygote = pool.zygote.pid
    finally:
        await pool.close()
    assert not any(group_pids(p) for p in spare_pids + [zygote])  # nothing left after close


async def test_the_planner_is_told_the_import_left_in_cpu_seconds(tmp_path) -> None:
    from runtime.engines.spares import IMPORT_S_GUESS

    pool = _pool(tmp_path, 2, SPARE_DOUBLE_SPIN="0.4", SPARE_DOUBLE_DELAY="0.5")
    assert pool.import_left() == (IMPORT_S_GUESS, IMPORT_S_GUESS)  # nothing started yet
    await pool.start()
    try:
        left = pool.import_left()
        assert all(0 < x <= IMPORT_S_GUESS for x in left)  # importing, nothing measured yet
        assert await pool.wait_ready(20) == 2
        # the import's CPU time, not its wall time (the double sleeps 0.5 s after spinning)
        assert pool.zygote is not None and pool.zygote.import_cpu_s is not None
        assert 0.4 <= pool.import_s() == pool.zygote.import_cpu_s < 0.4 + 0.5
        assert pool.import_left() == (0.0, 0.0)
        taken = pool.take()
        assert taken is not None
        assert pool.import_left() == (0.0, 0.0)  # its replacement is a fork of a ready zygote
        await taken.stop()
    finally:
        await pool.close()


async def test_a_zygote_that_died_hands_out_nothing_and_a_dead_spare_is_skipped(tmp_path) -> None:
    pool = _pool(tmp_path, 1, SPARE_DOUBLE_FAIL="1")
    await pool.start()
    try:
        assert pool.zygote is not None
        await asyncio.wait_for(pool.zygote.proc.wait(), 20)
        assert pool.take() is None and pool.ready_count() == 0
        assert pool._filling is not None
        await asyncio.wait_for(pool._filling, 10)  # gives up; never waits for it forever
    finally:
        await pool.close()
    pool = _pool(tmp_path, 1)
    await pool.start()
    try:
        assert await pool.wait_ready(20) == 1
        os.killpg(pool._spares[0].pid, 9)
        for _ in range(100):
            if not pool._spares[0].usable():
                break
            await asyncio.sleep(0.05)
        assert pool.take() is None
    finally:
        await pool.close()


async def test_executor_prices_and_records_starts_by_whether_a_spare_was_used(tmp_path) -> None:
    """The planner is told how many spares are ready and what a start without one costs; a start
    without a spare is stored as the start in a spare would have been (the two kinds do not mix)."""
    from scheduler.types import DevicePool
    from tests.runtime.fakes import FakeLauncher
    from tests.runtime.executor_kit import items, make_cfg, run_once

    class Pool:  # what the executor reads of a SparePool
        size = 3

        def __init__(self, ready: int) -> None:
            self.ready = ready

        def ready_count(self) -> int:
            return self.ready

        def import_s(self) -> float:
            return 7.0

        def import_left(self) -> tuple[float, ...]:
            return (0.0,) * self.ready + (7.0,) * (self.size - self.ready)

        def forks_ready(self) -> bool:
            return self.zygote_ready

        zygote_ready = False

    launcher = FakeLauncher()
    launcher.spares = Pool(0)
    ex = await run_once(make_cfg(tmp_path), launcher, DevicePool("cpu", (0, 1), 1 << 28),
                        items("a", 2))
    assert ex._spare_state() == ((7.0, 7.0, 7.0), 7.0)
    launcher.spares.ready = 1
    assert ex._spare_state() == ((0.0, 7.0, 7.0), 7.0)
    launcher.spares.zygote_ready = True  # every start finds a spare: priced as with none
    assert ex._spare_state() == (None, 0.0)
    launcher.spares.zygote_ready = False
    launcher.spares.size = 0
    assert ex._spare_state() == (None, 0.0)
    assert not getattr(launcher.engines[0], "spare_used", False)  # fakes never use one
    # 0.02 s measured without a spare: stored as that minus the import, floored at 1 s
    assert list(ex.learned.start_times.values()) == [1.0]
