"""The engine wrapper's fork start (`runtime.engines.api_server`): which OpenMP binding a forked
engine process takes; the real engines that start that way are checked in tests/test_engine.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from runtime.engines.api_server import rank_cores

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_rank_cores_reads_each_variable_vllm_sets() -> None:
    assert rank_cores({"GOMP_CPU_AFFINITY": "0 1"}) == [0, 1]
    assert rank_cores({"GOMP_CPU_AFFINITY": "2-4 7"}) == [2, 3, 4, 7]
    assert rank_cores({"KMP_AFFINITY": "granularity=fine,explicit,proclist=[1,3]"}) == [1, 3]
    assert rank_cores({"OMP_PLACES": "{0,1}", "OMP_PROC_BIND": "true"}) == [0, 1]
    assert rank_cores({"OMP_NUM_THREADS": "1"}) == []


CHILD = """
import json, os, sys
import torch
from runtime.engines.api_server import bind_after_fork
os.sched_setaffinity(0, {0, 1})
torch.set_num_threads(2)            # the parent's OpenMP state, as a spare's import leaves it
torch.ones(1 << 16).sum()
os.register_at_fork(after_in_child=bind_after_fork)
os.environ.update(GOMP_CPU_AFFINITY="1", OMP_NUM_THREADS="1")  # what vLLM sets for a worker
pid = os.fork()
if pid == 0:
    print(json.dumps([sorted(os.sched_getaffinity(0)), torch.get_num_threads()]), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs cores 0 and 1")
def test_a_forked_worker_takes_the_core_and_thread_count_vllm_meant() -> None:
    """Forked without this, the worker kept its parent's two threads on its one core and served
    7x slower (the module docstring)."""
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [[1], 1]
    assert "kept to cores [1], 1 thread(s)" in out.stderr
