"""The body of the Ray actor that holds one engine on its node (`runtime.engines.ray_launcher`).

The actor spawns vLLM's OpenAI server as the local launcher does (`build_command`, `base_env`, the
guard, `child_setup`: the engine's cores only, its niceness, its own session), bound to the node's
own address, and answers the gateway's polls, stop and log requests. Its methods return at once
(the actor runs them one at a time, on its main thread: the thread that spawned the engine must
live as long as the engine, or the parent-death signal would fire early).

Two guards, not one: when an actor dies, Ray SIGKILLs the worker's direct children, and a
SIGKILLed guard cannot take its group down. So the direct child is an outer guard and the engine
runs under an inner one: the outer guard's death (SIGKILL by Ray, or its own parent-death signal
when the worker dies with its node) is the inner guard's parent death, which then SIGTERMs the
group, SIGKILLs what is left after its grace period and unlinks what the group left in /dev/shm.
Both guards and the engine are one process group; a guard does not wait for its own parent.

Niceness: Ray runs its workers at nice 15 (`worker_niceness`); the engine gets the niceness it
would have on the gateway's machine (the gateway's own plus `[devices] engine_nice`) where the
node lets a process lower it (CAP_SYS_NICE), else keeps the worker's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from runtime.engines.engine import (LOG_TAIL_BYTES, EngineSpec, _signal_group, build_command,
                                    child_setup, free_port, read_tail)
from runtime.engines.procs import group_pids
from runtime.engines.shm import clear_unused, shm_names

REPO = Path(__file__).resolve().parents[2]


def node_setup(nice: int, cores: tuple[int, ...]) -> Callable[[], None]:
    """preexec_fn of the engine's outer guard: the absolute niceness `nice` (when allowed), then
    what every engine gets (`child_setup`: parent-death signal, autogroup, cores)."""
    local = child_setup(0, cores)

    def setup() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        except OSError:  # lowering it needs CAP_SYS_NICE: keep the worker's
            pass
        local()
    return setup


def node_address() -> str:
    """The address other machines reach this node at (Ray's own view of it)."""
    import ray

    return ray.util.get_node_ip_address()


class EngineHost:
    """One engine on this node: `start` (spawn, return where it listens), `poll`, `stop`,
    `log_tail`. Made a Ray actor by `runtime.engines.ray_launcher`."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    def start(self, spec: EngineSpec, nice: int) -> dict[str, Any]:
        host = node_address()
        port = free_port()
        cmd, env = build_command(spec, port, sys.executable, host=host)
        # vLLM in a Ray worker's environment would take Ray for its TP executor (and lose the
        # placement group in its engine core: vllm-project/vllm#30016); its own processes instead
        env.pop("RAY_ADDRESS", None)
        if spec.tp > 1 and "--distributed-executor-backend" not in cmd:
            cmd += ["--distributed-executor-backend", "mp"]
        cmd = [sys.executable, "-m", "runtime.engines.guard", *cmd]  # the outer guard (docstring)
        self.log_path = spec.log_path or Path(f"/tmp/samullm-engine-{port}.log")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(("$ " + " ".join(cmd) + f" (Ray actor {os.getpid()} on {host})\n").encode())
            log.flush()
            self.proc = subprocess.Popen(
                cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=node_setup(nice, spec.confined_cores()))
        return {"pid": self.proc.pid, "url": f"http://{host}:{port}", "host": host}

    def poll(self) -> int | None:
        """The outer guard's exit code, None while it runs."""
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout_s: float = 30) -> int | None:
        """SIGTERM the engine's group, SIGKILL what is left after `timeout_s`, then unlink what it
        left in /dev/shm, as the local launcher does (`Engine.stop`): the group's guards, signalled
        with it, note its names only after its processes may have dropped them (vLLM's message
        queues of a forked engine were left so, two per engine); returns the exit code."""
        if self.proc is None:
            return None
        pgid = self.proc.pid
        shm = shm_names(group_pids(pgid))
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while (self.proc.poll() is None or group_pids(pgid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if group_pids(pgid):
            _signal_group(pgid, signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 5
        while group_pids(pgid) and time.monotonic() < deadline:  # SIGKILLed ones: milliseconds
            time.sleep(0.05)
        clear_unused(shm)
        return self.proc.returncode

    def log_tail(self, nbytes: int = LOG_TAIL_BYTES) -> str:
        return read_tail(self.log_path, nbytes)
