"""Spare engine processes (parent side): interpreters that have imported vLLM's API server already, so
that an engine start skips that import (~7 s of a ~21 s CPU start here; see `runtime.engines.spare_child`
for why only that one of the three imports can be skipped, and for the protocol).

`SparePool(size)` keeps up to `size` spares. `take()` hands out one that is ready (imported, alive) or
None; `refill()` (the launcher calls it once that engine is up) starts replacements; a spare that is not ready yet is never handed out (it waits at
nice 19 and would import slowly on a busy machine). Each spare leads its own process group through
`runtime.engines.guard`, like an engine, so a killed gateway takes its spares down too, and `close()`
stops them. Spares exist only for CPU engines: on GPUs the API server's import decides things
(CUDA_VISIBLE_DEVICES, the platform) that this has not been tested with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from runtime.engines.procs import group_cpu_s, set_autogroup_nice, set_pdeathsig
from runtime.engines.api_server import ENGINE_MAIN
from runtime.engines.spare_child import SPARE_NICE

if TYPE_CHECKING:
    from runtime.config import Config
    from scheduler.types import DevicePool

log = logging.getLogger(__name__)
IMPORT_S_GUESS = 7.0  # API server import on one core of the development machine (measured 6.7-7.9 s)
# A fresh start imports the API server on the engine's own core, so what it costs more than a start
# in a spare is the import's CPU time, not a spare's wall time: three spares importing at once on
# two cores took 9.5-11.3 s each (makespan bench, 1 Dec), while fresh starts were only ~5-7 s longer.


def spare_count(cfg: "Config", pool: "DevicePool") -> int:
    """How many spares a gateway with `cfg` on `pool` keeps: none when no model can run."""
    if not any(m.resolved_path(cfg.base_dir) is not None for m in cfg.models):
        return 0
    return cfg.devices.effective_spare_engines(pool.kind, len(pool.ids))


def _spare_setup() -> None:
    set_pdeathsig()
    os.nice(SPARE_NICE)
    set_autogroup_nice(SPARE_NICE)  # a session leader here (start_new_session)


class Spare:
    """One spare process: `python -m runtime.engines.guard python -m runtime.engines.spare_child`."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.log_path = log_path
        self.ready = asyncio.Event()
        self.import_cpu_s: float | None = None  # CPU seconds its import took (guard included)
        self._reader = asyncio.create_task(self._wait_ready(), name=f"spare-{proc.pid}")

    async def _wait_ready(self) -> None:
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if line.strip() == b"ready":
            self.import_cpu_s = self.cpu_s()
            self.ready.set()

    def cpu_s(self) -> float:
        return group_cpu_s(self.pid)

    def import_left_s(self, import_s: float) -> float:
        """CPU seconds of import it has left, for the planner: 0 once ready; a dead one is replaced
        by a fresh import; one that used `import_s` already without being ready is near the end."""
        if self.usable():
            return 0.0
        if self.proc.returncode is not None:
            return import_s
        return max(0.1 * import_s, import_s - self.cpu_s())

    def usable(self) -> bool:
        return self.ready.is_set() and self.proc.returncode is None

    async def adopt(self, cmd: list[str], env: dict[str, str], cores: tuple[int, ...], nice: int,
                    log_path: Path) -> asyncio.subprocess.Process:
        """Turn the spare into the engine `cmd` (an api_server command line from
        `runtime.engines.engine.build_command`) at the absolute niceness `nice`; returns its process (the
        group leader, as a spawn's)."""
        argv = cmd[cmd.index(ENGINE_MAIN) + 1:]
        msg = {"argv": argv, "env": env, "cores": list(cores), "nice": nice, "log": str(log_path)}
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        await self.proc.stdin.drain()
        self.proc.stdin.close()
        self._reader.cancel()
        return self.proc

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGTERM)  # the guard takes the group down
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
                await self.proc.wait()
        self._reader.cancel()

    def kill_sync(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)


class SparePool:
    def __init__(self, size: int, log_dir: Path, env: Callable[[], dict[str, str]],
                 python: str = sys.executable, module: str = "runtime.engines.spare_child") -> None:
        self.size = size
        self.module = module  # the child's `python -m` module (tests put a double here)
        self.log_dir = log_dir
        self._env = env  # the engines' environment without per-engine keys (engine.base_env)
        self.python = python
        self._spares: list[Spare] = []
        self._all: list[Spare] = []  # every spare started (recent), for import_s
        self._filling: asyncio.Task | None = None
        self._closed = False
        self._n = 0

    def import_s(self) -> float:
        """What an engine start without a ready spare costs more: the least CPU time the import of a
        spare of this pool took, else IMPORT_S_GUESS."""
        seen = [s.import_cpu_s for s in self._all if s.import_cpu_s]
        return min(seen) if seen else IMPORT_S_GUESS

    def import_left(self) -> tuple[float, ...]:
        """Per spare the pool keeps (`size` of them), the CPU seconds of import left (0: ready); a
        spare taken and not replaced yet counts as a whole import."""
        work = self.import_s()
        live = [s.import_left_s(work) for s in self._spares]
        return tuple(sorted(live + [work] * max(0, self.size - len(live))))

    def ready_count(self) -> int:
        return sum(s.usable() for s in self._spares)

    async def start(self) -> None:
        """Spawn the spares (returns at once; they become ready in the background)."""
        await self._fill()

    async def _fill(self) -> None:
        self._spares = [s for s in self._spares if s.proc.returncode is None]
        while not self._closed and len(self._spares) < self.size:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._n += 1
            log_path = self.log_dir / f"spare-{os.getpid()}-{self._n}.log"
            with open(log_path, "ab") as logf:
                proc = await asyncio.create_subprocess_exec(
                    self.python, "-m", "runtime.engines.guard", self.python, "-m",
                    self.module, env=self._env(), stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE, stderr=logf, start_new_session=True,
                    preexec_fn=_spare_setup)
            self._spares.append(Spare(proc, log_path))
            self._all.append(self._spares[-1])
            del self._all[:-16]  # recent ones are enough for import_s
            log.info("spare engine process %d started (log %s)", proc.pid, log_path)

    def take(self) -> Spare | None:
        """A ready spare (removed from the pool), or None. Call `refill()` once the engine it became
        has started: a replacement importing meanwhile would slow that start down."""
        for spare in self._spares:
            if spare.usable():
                self._spares.remove(spare)
                return spare
        return None

    def refill(self) -> None:
        """Start replacements for spares taken or dead (in the background)."""
        if not self._closed and (self._filling is None or self._filling.done()):
            self._filling = asyncio.create_task(self._fill(), name="spare-fill")

    async def wait_ready(self, timeout_s: float) -> int:
        """Wait until every spare is ready (or `timeout_s`); returns how many are."""
        deadline = time.monotonic() + timeout_s
        while self.ready_count() < self.size and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return self.ready_count()

    async def close(self) -> None:
        self._closed = True
        if self._filling is not None:
            await asyncio.gather(self._filling, return_exceptions=True)
        spares, self._spares = self._spares, []
        await asyncio.gather(*(s.stop() for s in spares), return_exceptions=True)

    def kill_sync(self) -> None:
        for s in self._spares:
            s.kill_sync()
