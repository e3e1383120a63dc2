"""Process-group leader of one engine: `python -m runtime.engines.guard CMD...`.

Why: PR_SET_PDEATHSIG alone is not enough. vLLM's api_server loses a SIGTERM that arrives while it
is still starting (before uvicorn installs its handlers), and its engine-core/worker processes do
not watch their parent; a gateway killed during an engine start left the engine running. This guard
runs CMD as its child in its own process group and, when its parent dies (PDEATHSIG, or its parent
pid changes) or it receives SIGTERM, SIGTERMs the group, waits a grace period, then SIGKILLs what is
left. It exits with CMD's exit code. Standard library only, so it starts in milliseconds. A spare
engine process forked by `runtime.engines.zygote` is led the same way (`supervise`), by a guard
that watches the gateway instead of its parent (the zygote).

Shared memory: a group that did not shut down by itself (SIGKILLed after the grace period, or whose
processes died without cleanup) leaves vLLM's /dev/shm segments and semaphores behind, and with its
parent dead nobody else would unlink them. The guard notes what its group maps or has open before it
signals the group, and once the group is gone unlinks those no live process uses (`runtime.engines.shm`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Callable

from runtime.engines.procs import group_pids, set_pdeathsig
from runtime.engines.shm import clear_unused, shm_names

GRACE_S = 20.0
POLL_S = 0.25


def _others_in_group(pgid: int, parent: int) -> list[int]:
    """The live processes of the group but this guard and its parent: a guard may run under
    another guard of the same group (an engine on a Ray node, `runtime.engines.ray_host`), which
    waits for this one; each waiting for the other would only end at the grace period."""
    me = os.getpid()
    return [pid for pid in group_pids(pgid) if pid not in (me, parent)]


class Forked:
    """A child this process forked (not spawned): what `supervise` needs of a `subprocess.Popen`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode


def main(cmd: list[str]) -> int:
    parent = os.getppid()
    set_pdeathsig()
    return supervise(lambda: subprocess.Popen(cmd), lambda: os.getppid() == parent, parent)


def supervise(start: Callable[[], "subprocess.Popen | Forked"], keep: Callable[[], bool],
              parent: int) -> int:
    """Run `start()`'s child in this process's group until it exits, or until this process gets
    SIGTERM/SIGINT or `keep()` turns false (whoever it serves is gone); then take the group down
    and clear what it left in /dev/shm. `parent`: a process of the group that is not waited for.
    Returns the child's exit code (128 + signal when it was killed)."""
    pgid = os.getpgid(0)
    stopping = False

    def shutdown(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    child = start()
    while child.poll() is None and not stopping:
        if not keep():
            stopping = True
            break
        time.sleep(POLL_S)
    # before a signal: exiting processes drop their maps
    shm = shm_names(_others_in_group(pgid, parent))
    if stopping:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.killpg(pgid, signal.SIGTERM)
        os.killpg(pgid, signal.SIGCONT)  # an engine asleep on CPU (frozen) acts on it only when running
    deadline = time.monotonic() + GRACE_S
    while _others_in_group(pgid, parent) and time.monotonic() < deadline:
        child.poll()  # reap the direct child so it does not count as alive
        time.sleep(POLL_S)
    rest = _others_in_group(pgid, parent)
    shm.update(shm_names(rest))
    for pid in rest:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    rc = child.wait()
    deadline = time.monotonic() + 5
    # dying ones still map theirs
    while _others_in_group(pgid, parent) and time.monotonic() < deadline:
        time.sleep(0.02)
    cleared, _ = clear_unused(shm)
    if cleared:
        print(f"engine_guard: unlinked {len(cleared)} left in /dev/shm: {' '.join(cleared)}",
              file=sys.stderr, flush=True)
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
