"""vLLM's OpenAI API server as samullm runs it: `python -m runtime.engines.api_server ARGS...` for a
fresh start, `run(argv)` in a spare (`runtime.engines.spare_child`).

Why a wrapper: on CPU most of an engine's start is its engine-core and worker processes importing
torch and vLLM afresh (~6 s each on one core here), because vLLM's CPU platform forces the `spawn`
start method (`CpuPlatform.check_and_update_config`). It does so because it binds each worker's
OpenMP threads through environment variables (OMP_NUM_THREADS, GOMP_CPU_AFFINITY, OMP_PLACES or
KMP_AFFINITY) set just before it starts the worker, and a forked child's OpenMP runtime, set up when
its parent imported torch, never reads them. Where every rank has one core that binding is simple:
the rank's process kept to its core, one thread. So when `build_command` sets FORK_ENV (CPU, one core
per rank), this sets the start method back to `fork` after the platform chose `spawn`, and in each
forked child applies what those variables say (`bind_after_fork`).

Measured on the 2-core development machine (5 Dec 2026; `bench/README.md`, "Engine starts"): a
start in a spare took 3.5-4.0 s instead of 13-14.5 s (the demo models at TP 1 and TP 2), at the
same serving rate (medium TP 1, 64 requests of 64 tokens: 5.7-5.9 s against 5.7 s spawned).
Forking without the binding ran two OpenMP threads on the one core and served 7x slower
(tests/runtime/test_api_server.py checks the binding). A rank on several cores keeps `spawn`:
without per-thread binding its threads float over its cores (small, one rank on both cores:
1.3-1.5 s against 1.0-1.1 s). Should a later vLLM lack the hook patched here, the server starts
with `spawn`, as vLLM would, only slower (a warning says so).
"""

from __future__ import annotations

import os
import re
import runpy
import sys

VLLM_API_SERVER = "vllm.entrypoints.openai.api_server"
ENGINE_MAIN = "runtime.engines.api_server"  # this module, what engine command lines run
FORK_ENV = "SAMULLM_FORK_ENGINE"  # "1": fork the engine core and workers (set by build_command)


def rank_cores(env: os._Environ | dict[str, str]) -> list[int]:
    """The cores vLLM's OpenMP setup gave this process, from whichever variable it set
    (`vllm.utils.ompmultiprocessing.configure_omp_envs`): GOMP_CPU_AFFINITY "0 1" or "0-3",
    KMP_AFFINITY "...,proclist=[0,1]", OMP_PLACES "{0,1}"; [] when none is set."""
    text = env.get("GOMP_CPU_AFFINITY")
    if text is None:
        m = re.search(r"proclist=\[([^\]]*)\]", env.get("KMP_AFFINITY", ""))
        text = m.group(1) if m else env.get("OMP_PLACES", "").strip("{}")
    cores: list[int] = []
    for part in re.split(r"[\s,]+", text.strip()):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cores.extend(range(int(lo), int(hi or lo) + 1))
    return cores


def bind_after_fork() -> None:
    """In a forked child: keep the process to the cores vLLM meant its threads for, and give torch
    the thread count it meant (its OpenMP runtime read OMP_NUM_THREADS in the parent, long ago).
    Nothing when those variables are not set: the engine core, forked from the API server."""
    try:
        cores = rank_cores(os.environ)
        threads = os.environ.get("OMP_NUM_THREADS")
        if cores:
            os.sched_setaffinity(0, cores)
        torch = sys.modules.get("torch")
        if threads and torch is not None:
            torch.set_num_threads(int(threads))
        if cores or threads:
            os.write(2, f"samullm: forked engine process {os.getpid()} kept to cores {cores}, "
                        f"{threads} thread(s)\n".encode())
    except (OSError, ValueError) as exc:  # never take the child down over its binding
        os.write(2, f"samullm: forked engine process not bound: {exc}\n".encode())


def fork_children() -> bool:
    """With FORK_ENV set: have vLLM fork its engine core and workers (see the module docstring);
    True when that was arranged."""
    if os.environ.get(FORK_ENV) != "1":
        return False
    try:
        from vllm.platforms.cpu import CpuPlatform
        platform_config = CpuPlatform.check_and_update_config.__func__
    except (ImportError, AttributeError) as exc:
        print(f"samullm: this vLLM has no CpuPlatform.check_and_update_config ({exc}); engine "
              "processes start with spawn", file=sys.stderr, flush=True)
        return False

    def check_and_update_config(cls, vllm_config) -> None:  # type: ignore[no-untyped-def]
        platform_config(cls, vllm_config)
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"

    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)  # type: ignore
    os.register_at_fork(after_in_child=bind_after_fork)
    return True


def run(argv: list[str]) -> None:
    """Run vLLM's API server in this interpreter, as `python -m VLLM_API_SERVER *argv` would
    (sys.argv and `__main__` as that command line sets them, so children it spawns import the same
    main module)."""
    fork_children()
    sys.argv = [VLLM_API_SERVER, *argv]
    runpy.run_module(VLLM_API_SERVER, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    run(sys.argv[1:])
