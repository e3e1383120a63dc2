"""A spare engine process (child side): an interpreter that has already imported vLLM's API server.

Why: most of an engine's start on CPU is Python interpreters importing torch and vLLM: the API server,
then the engine core and worker it starts, ~7 s each on one core here. Where every rank has one core,
`runtime.engines.api_server` has those two forked from the API server, so one import is all a start
pays, and this does it before the engine is needed (a start then takes ~3 s); elsewhere they are
spawned and import again (~15 s). `runtime.engines.spares` keeps such processes ready (a pre-fork
server's preload, for an engine).

Protocol (`python -m runtime.engines.guard python -m runtime.engines.spare_child`, stdin and stdout pipes):
the process imports the API server, writes "ready" on stdout, then reads ONE JSON line from stdin:
{"argv": [...], "env": {...}, "cores": [...], "nice": n, "log": path}. It sends its stdout and
stderr to `log` (append; the engine core and workers it starts inherit them), replaces its
environment with `env`, takes the CPU affinity `cores` (when given) and the niceness `nice` (it
waits at nice 19; raising priority back needs CAP_SYS_NICE, and without it the engine keeps 19),
and runs `python -m runtime.engines.api_server *argv` in this interpreter
(`runtime.engines.api_server.run`). EOF on stdin before a command: exit 0 (retired).
"""

from __future__ import annotations

import importlib
import json
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


def main() -> int:
    importlib.import_module(VLLM_API_SERVER)  # the expensive part: torch, transformers, vLLM
    for name in PRELOAD:  # what its main() imports late; a module moved in another vLLM is skipped
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    cmd = json.loads(line)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
