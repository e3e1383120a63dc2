"""The planner in a process of its own.

Why: the planner is pure Python (the simulator's loop) and takes 0.1–2 s per pass on a pool of a
few thousand requests. In a thread of the gateway it holds the GIL for that long, and every request
the event loop serves meanwhile waits for the GIL after each system call (the "convoy effect"): with
50 clients and a re-plan on every new batch the gateway's p99 went to 3–5 s (`bench/load.py`). In a
separate process it only competes for a core, which the OS shares out in milliseconds.

`ProcessPlanner` is a drop-in for `scheduler.planner.plan` (same call signature), so the executor
still calls it from `asyncio.to_thread`: that thread only pickles the problem and waits on a pipe.
One worker, started on first use with the spawn method (the gateway has threads and an event loop,
which fork would copy half-alive) and kept warm; a worker that died (killed, out of memory) is
replaced once per call. The worker gets SIGTERM when the gateway dies (`PR_SET_PDEATHSIG`).
Each batch's predicted completion (`PlanningProblem.groups`, a replay of the schedule) is computed
by `plan` in the worker too, and comes back with the schedule (`CompletedSchedule`).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from runtime.engines.procs import set_autogroup_nice, set_pdeathsig
from scheduler.planner import PlanningProblem, plan
from scheduler.types import Schedule

WORKER_NICE = 10


def _init_worker() -> None:
    """Die with the gateway (a SIGKILLed gateway must leave no process behind: the worker would
    otherwise wait on its queue forever), and import the scheduler before the first problem."""
    set_pdeathsig()
    if os.getppid() == 1:  # the gateway died before the line above ran
        os._exit(0)
    # Planning is background work: when cores are short (engines busy, CPU node) the gateway's
    # event loop must win the core, or every API call waits behind a re-plan; and so must the
    # engines, or a re-plan on every new batch slows the batches it plans. With autogroups a
    # niceness weighs only within a session, and the engines lead sessions of their own at
    # autogroup nice 5: left in the gateway's session at nice 10, the worker took 3/4 of a shared
    # core from an engine (measured, 5 Dec 2026), and a 20-request batch on `small`'s engine took
    # 0.55-0.78 s while re-plans of the 2,000-request pool ran, against 0.11-0.28 s alone
    # (`bench/fairness.py --mix`). So it leads a session of its own at that niceness (it dies
    # with the gateway by the parent-death signal above, not by its process group).
    os.setsid()
    os.nice(WORKER_NICE)
    set_autogroup_nice(WORKER_NICE)


def _ping() -> int:
    return os.getpid()


class ProcessPlanner:
    """Callable like `plan(problem, strategy)`, computed in a worker process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_worker)
            return self._pool

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def __call__(self, problem: PlanningProblem, strategy: str = "samullm", **kw: Any) -> Schedule:
        pool = self._executor()
        try:
            return pool.submit(plan, problem, strategy, **kw).result()
        except BrokenProcessPool:  # the worker died: one more try on a fresh one
            self._discard(pool)
        return self._executor().submit(plan, problem, strategy, **kw).result()

    def warm_up(self) -> int:
        """Start the worker now, from the calling thread (the parent-death signal is tied to the
        thread that starts the worker: call it from the main thread); returns the worker's pid."""
        return self._executor().submit(_ping).result()

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
