"""A spare engine process (child side): what the zygote imports once (`preload`), and what a spare
forked from it does with the command it is given (`become`).

Why: most of an engine's start on CPU is Python interpreters importing torch and vLLM: the API server,
then the engine core and worker it starts, ~7 s each on one core here. Where every rank has one core,
`runtime.engines.api_server` has those two forked from the API server, so one import is all a start
pays; `runtime.engines.zygote` pays it once for every spare, before an engine is needed (a start then
takes ~3.5 s instead of ~10.5 s). Elsewhere the two are spawned and import again (~16 s).

The command (one JSON line; `runtime.engines.spares.Spare.adopt`): {"argv": [...], "env": {...},
"cores": [...], "nice": n, "log": path}. The spare sends its stdout and stderr to `log` (append; the
engine core and workers it starts inherit them), replaces its environment with `env`, takes the CPU
affinity `cores` (when given) and the niceness `nice` (it waits at nice 19; raising priority back
needs CAP_SYS_NICE, and without it the engine keeps 19), and runs `python -m
runtime.engines.api_server *argv` in this interpreter (`runtime.engines.api_server.run`).
"""

from __future__ import annotations

import importlib
import os
import sys

from runtime.engines.api_server import VLLM_API_SERVER, run

PRELOAD = ("vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.serve.utils.api_utils",
           "vllm.utils.argparse_utils", "uvloop")
SPARE_NICE = 19  # while waiting: import only on otherwise idle CPU


def _set_nice(target: int) -> None:
    current = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, target)
    except PermissionError:
        print(f"spare: cannot restore niceness {target} (no CAP_SYS_NICE); running at {current}",
              file=sys.stderr, flush=True)
    try:
        with open("/proc/self/autogroup", "w") as f:  # see runtime.engines.engine.set_autogroup_nice
            f.write(str(target))
    except OSError:
        pass


def _redirect(log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def preload() -> None:
    """The expensive part: torch, transformers, vLLM."""
    importlib.import_module(VLLM_API_SERVER)
    for name in PRELOAD:  # what its main() imports late; a module moved in another vLLM is skipped
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def become(cmd: dict) -> None:
    """Turn this process into the engine `cmd` describes (the protocol's JSON line)."""
    _redirect(cmd["log"])
    os.environ.clear()
    os.environ.update(cmd["env"])
    if cmd.get("cores"):
        os.sched_setaffinity(0, cmd["cores"])
    _set_nice(int(cmd.get("nice", 0)))
    devnull = os.open(os.devnull, os.O_RDONLY)  # the command pipe is done with
    os.dup2(devnull, 0)
    os.close(devnull)
    run(cmd["argv"])
