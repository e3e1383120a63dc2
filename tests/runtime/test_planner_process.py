"""The planner in its own process: same answers as in-process, survives a killed worker, and the
executor plans through it."""

from __future__ import annotations

import asyncio
import os
import signal

import numpy as np
import pytest

from runtime.config import DEFAULT_CPU_ENGINE_NICE
from runtime.executor.planner_process import WORKER_NICE, ProcessPlanner
from runtime.executor.planning import KvBytes, build_problem
from runtime.executor.latency_source import LatencySource
from scheduler.planner import plan
from scheduler.types import DevicePool, ModelSpec, SimRequest
from tests.runtime.executor_kit import Sink, items, make_cfg
from tests.runtime.fakes import FakeLauncher

SPECS = {m: ModelSpec(m, num_layers=2 * k, hidden_size=128 * k, num_heads=2, num_kv_heads=1,
                      intermediate_size=512 * k, vocab_size=2048, max_model_len=1024,
                      max_num_seqs=16, max_num_batched_tokens=1024)
         for m, k in (("a", 1), ("b", 2), ("c", 4))}


def problem(tmp_path):
    cfg = make_cfg(tmp_path)
    pool = DevicePool("cpu", (0, 1, 2, 3), 1 << 28)
    rng = np.random.default_rng(0)
    work = {m: [SimRequest(i, int(rng.integers(10, 200)), int(rng.integers(5, 300)))
                for i in range(n)] for m, n in (("a", 300), ("b", 200), ("c", 100))}
    latency = LatencySource.load(tmp_path, pool, list(work), {})
    return build_problem(cfg, pool, SPECS, latency, work, {}, seed=1)


@pytest.fixture
def planner():
    p = ProcessPlanner()
    yield p
    p.close()


def test_same_schedule_as_in_process(tmp_path, planner) -> None:
    prob = problem(tmp_path)
    assert isinstance(prob.kv_bytes_per_rank, KvBytes)  # picklable, unlike a closure
    for strategy in ("samullm", "sequential"):
        here, there = plan(prob, strategy), planner(prob, strategy)
        assert there.makespan_s == pytest.approx(here.makespan_s)
        assert [[(p.model, p.tp, p.dp, p.devices) for p in st.plans] for st in there.stages] == \
            [[(p.model, p.tp, p.dp, p.devices) for p in st.plans] for st in here.stages]


def test_a_killed_worker_is_replaced(tmp_path, planner) -> None:
    prob = problem(tmp_path)
    pid = planner.warm_up()
    assert pid != os.getpid()
    assert os.getpriority(os.PRIO_PROCESS, pid) >= os.getpriority(os.PRIO_PROCESS, 0) + 10
    os.kill(pid, signal.SIGKILL)
    assert planner(prob, "sequential").stages  # a new worker answers
    assert planner.warm_up() != pid


def test_the_worker_yields_to_engines_across_sessions(planner) -> None:
    """With autogroups, niceness weighs only within a session: a worker left in the gateway's
    session at nice 10 took 3/4 of a core from an engine at autogroup nice 5 (measured, 5 Dec), so
    a re-plan slowed the small batches it was planning. Its own session, at a niceness above the
    engines', makes it the one that yields."""
    if not os.path.exists("/proc/self/autogroup"):
        pytest.skip("kernel without autogroups: niceness weighs across sessions already")
    pid = planner.warm_up()
    assert os.getsid(pid) == pid != os.getsid(0)
    group, nice = open(f"/proc/{pid}/autogroup").read().split(" nice ")
    assert group != open("/proc/self/autogroup").read().split(" nice ")[0]
    assert int(nice) == WORKER_NICE > DEFAULT_CPU_ENGINE_NICE


def test_the_worker_dies_with_its_parent(tmp_path) -> None:
    """A SIGKILLed gateway leaves no planner process behind."""
    import subprocess
    import sys
    import time

    code = ("from runtime.executor.planner_process import ProcessPlanner; import time; "
            "print(ProcessPlanner().warm_up(), flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.path.exists(f"/proc/{worker}"):
            with open(f"/proc/{worker}/stat") as f:
                if f.read().split(") ")[1][0] == "Z":
                    break
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{worker}") or "Z" in open(f"/proc/{worker}/stat").read().split(") ")[1][:1]
    finally:
        parent.kill()


def test_planning_errors_come_back_as_themselves(tmp_path, planner) -> None:
    with pytest.raises(ValueError):
        planner(problem(tmp_path), "no-such-strategy")


async def test_executor_plans_through_the_process(tmp_path, planner) -> None:
    from runtime.executor.executor import PoolExecutor

    launcher = FakeLauncher(delay_s={"a": 0.01, "b": 0.01})
    cfg = make_cfg(tmp_path)
    ex = PoolExecutor(cfg, launcher, planner=planner,
                      pool=DevicePool("cpu", (0, 1), int(cfg.devices.cpu_kvcache_gib * 2**30)))
    await ex.start()
    try:
        ex.submit("x", items("a", 6) + items("b", 4), sink := Sink())
        await asyncio.wait_for(ex.wait("x"), 60)
        assert sorted(o.custom_id for o in sink.outcomes if o.ok) == sorted(
            [f"a-{i}" for i in range(6)] + [f"b-{i}" for i in range(4)])
        assert any(e["event"] == "plan" for e in ex.events("x"))
    finally:
        await ex.close()
