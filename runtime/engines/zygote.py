"""The spare maker (child side): one interpreter that imports vLLM's API server once and forks spare
engine processes from itself, so that a spare costs a fork (milliseconds) instead of an import (~7
CPU seconds on one core here).

Why: an engine start from a spare takes ~3.5 s on CPU, without one ~11 s (the import;
`runtime.engines.api_server`). Spares used to import each for themselves at nice 19, on idle CPU
only, and while engines kept every core busy none became ready: in the fairness mix of 5 Dec the
three starts after the first three found none (11.0-11.6 s each). Forked, a spare is ready at once
and costs no CPU; its memory is the zygote's, shared until written.

Protocol (`python -m runtime.engines.guard python -m runtime.engines.zygote`, stdin and stdout
pipes, one JSON object per line): the zygote imports, writes {"ready": true}; then, per line
{"fork": id, "fifo": path, "log": path, "watch": pid} on stdin, forks a spare and writes
{"fork": id, "pid": n}, n its guard's pid; when a spare's guard exits it writes
{"exit": n, "code": c}. EOF on stdin: it exits (the spares live on).

A spare: the forked child leads a session and process group of its own, as every engine does
(`runtime.engines.engine`), and forks again. The parent is the group's guard
(`runtime.engines.guard.supervise`), which takes the group down when the process `watch` (the
gateway) is gone or on SIGTERM; the child writes its output to `log`, opens the FIFO `fifo`, reads
one command line of `runtime.engines.spare_child`'s protocol and becomes that engine (`become`).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import sys
from typing import Callable

from runtime.engines.guard import Forked, supervise
from runtime.engines.procs import set_autogroup_nice
from runtime.engines.spare_child import become, preload


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _spare(req: dict, become: Callable[[dict], None], zygote_fds: tuple[int, ...]) -> None:
    """In the forked child: lead a session, fork the spare proper, guard it; never returns."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        for fd in zygote_fds:
            os.close(fd)
        os.setsid()
        set_autogroup_nice(os.getpriority(os.PRIO_PROCESS, 0))  # a new session: its own autogroup
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # the zygote's pipes are not this process's
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(devnull)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        watch = int(req["watch"])

        def start() -> Forked:
            pid = os.fork()
            if pid == 0:
                rc = 1
                try:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    with open(req["fifo"]) as f:  # blocks until the gateway opens it to write
                        line = f.readline()
                    if line.strip():
                        become(json.loads(line))
                    rc = 0
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(rc)
            return Forked(pid)

        print(f"spare {os.getpid()} forked from zygote {os.getppid()}", flush=True)
        code = supervise(start, lambda: _alive(watch), os.getppid())
    finally:
        os._exit(code)


def serve(preload: Callable[[], None], become: Callable[[dict], None]) -> int:
    """The zygote's life: `preload`, then fork spares on request until stdin ends."""
    preload()
    out = sys.stdout

    def say(msg: dict) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # the wakeup fd does the work
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ, "stdin")
    sel.register(wake_r, selectors.EVENT_READ, "child")
    say({"ready": True})
    buf = b""
    while True:
        for key, _ in sel.select():
            if key.data == "child":
                os.read(wake_r, 4096)
                while True:
                    try:
                        pid, status = os.waitpid(-1, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if not pid:
                        break
                    say({"exit": pid, "code": os.waitstatus_to_exitcode(status)})
                continue
            chunk = os.read(0, 65536)
            if not chunk:
                return 0
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                req = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    sel.close()
                    _spare(req, become, (wake_r, wake_w))
                say({"fork": req["fork"], "pid": pid})


def main() -> int:
    return serve(preload, become)


if __name__ == "__main__":
    sys.exit(main())
