"""Engine processes run at the configured niceness (the gateway wins a contended core)."""

from __future__ import annotations

import asyncio
import os
import subprocess

from runtime.engine import _child_setup
from scheduler.types import DevicePool
from tests.runtime.fakes import FakeLauncher
from tests.runtime.test_executor import Sink, items, make_cfg


def test_child_setup_adds_niceness_to_the_process() -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    for nice in (0, 5):
        child = subprocess.Popen(["sleep", "5"], preexec_fn=_child_setup(nice))
        try:
            assert os.getpriority(os.PRIO_PROCESS, child.pid) == min(19, base + nice)
        finally:
            child.kill()
            child.wait()


async def test_cpu_engines_are_started_nice(tmp_path) -> None:
    from runtime.executor import PoolExecutor

    launcher = FakeLauncher()
    cfg = make_cfg(tmp_path)
    ex = PoolExecutor(cfg, launcher, pool=DevicePool("cpu", (0, 1), 1 << 28))
    await ex.start()
    try:
        ex.submit("x", items("a", 2), Sink())
        await asyncio.wait_for(ex.wait("x"), 30)
    finally:
        await ex.close()
    assert [e.spec.nice for e in launcher.engines] == [5]
