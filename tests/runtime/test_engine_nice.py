"""Engine processes run at the configured niceness (the gateway wins a contended core)."""

from __future__ import annotations

import os
import subprocess

from runtime.engine import _child_setup
from scheduler.types import DevicePool
from tests.runtime.fakes import FakeLauncher
from tests.runtime.test_executor import items, make_cfg, run_once


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
    launcher = FakeLauncher()
    await run_once(make_cfg(tmp_path), launcher, DevicePool("cpu", (0, 1), 1 << 28), items("a", 2))
    assert [e.spec.nice for e in launcher.engines] == [5]
