"""Spare engine processes (parent side): processes that have vLLM's API server imported already, so
that an engine start skips that import (~7 CPU s of a ~10.5 s start on one core here; with it, the
start takes ~3.5 s: `runtime.engines.api_server`).

One zygote (`runtime.engines.zygote`) imports once, at nice 19 so on idle CPU only, and forks the
spares: each is ready at once and costs no CPU, so the pool is full again as soon as one is taken
(spares that imported each for themselves were not, while engines kept the cores busy).
`SparePool(size)` keeps `size` forked spares. `take()` hands out one (None before the zygote is
ready); `refill()` forks replacements. Each spare leads its own session and process group under a
guard that watches this process, like an engine, so a killed gateway takes its spares (and the
engines they became) down, and `close()` stops the zygote and the spares not taken. Spares exist
only for CPU engines: on GPUs the API server's import decides things (CUDA_VISIBLE_DEVICES, the
platform) that this has not been tested with.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from runtime.engines.api_server import ENGINE_MAIN
from runtime.engines.procs import group_cpu_s, group_pids, set_autogroup_nice, set_pdeathsig
from runtime.engines.spare_child import SPARE_NICE

if TYPE_CHECKING:
    from runtime.config import Config
    from scheduler.types import DevicePool

log = logging.getLogger(__name__)
IMPORT_S_GUESS = 7.0  # API server import on one core of the development machine (measured 6.7-7.9 s)
# A fresh start imports the API server on the engine's own core, so what it costs more than a start
# in a spare is the import's CPU time, not a wall time: the zygote imports at nice 19, on idle CPU.


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
    """One forked spare: its guard's `pid` (leader of its session and process group) and the FIFO
    it reads its command from. Once adopted it is also the engine's process handle (`pid`,
    `returncode`, `wait()`, as `asyncio.subprocess.Process` has them): its exit is reported by the
    zygote, whose child the guard is, or seen in /proc when the zygote is gone."""

    def __init__(self, pid: int, fifo: Path, log_path: Path, zygote: "Zygote") -> None:
        self.pid = pid
        self.fifo = fifo
        self.log_path = log_path
        self.returncode: int | None = None
        self._zygote = zygote
        self._exited = asyncio.Event()

    def exited(self, code: int) -> None:
        self.returncode = code
        self._exited.set()

    def _gone(self) -> bool:
        """Exited, also when nobody reported it (the zygote died and init reaped the guard)."""
        if self.returncode is None and not self._zygote.alive() and not group_pids(self.pid):
            self.exited(-1)
        return self.returncode is not None

    def usable(self) -> bool:
        return not self._gone()

    async def wait(self) -> int:
        while not self._gone():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._exited.wait(), 0.2)
        assert self.returncode is not None
        return self.returncode

    async def adopt(self, cmd: list[str], env: dict[str, str], cores: tuple[int, ...], nice: int,
                    log_path: Path) -> "Spare":
        """Turn the spare into the engine `cmd` (an api_server command line from
        `runtime.engines.engine.build_command`) at the absolute niceness `nice`; returns its
        process handle (the group leader, as a spawn's)."""
        argv = cmd[cmd.index(ENGINE_MAIN) + 1:]
        msg = {"argv": argv, "env": env, "cores": list(cores), "nice": nice, "log": str(log_path)}
        data = json.dumps(msg).encode() + b"\n"
        for _ in range(100):  # the spare opens the FIFO right after its fork
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as exc:  # ENXIO: no reader yet
                if self._gone():
                    raise BrokenPipeError(f"spare {self.pid} is gone") from exc
                await asyncio.sleep(0.02)
        else:
            raise BrokenPipeError(f"spare {self.pid} never opened {self.fifo}")
        try:
            os.set_blocking(fd, True)  # the spare waits in its read: this does not block long
            view = memoryview(data)  # the environment makes it longer than one pipe buffer
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                self.fifo.unlink()
        return self

    async def stop(self) -> None:
        if not self._gone():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGTERM)  # the guard takes the group down
            try:
                await asyncio.wait_for(self.wait(), 30)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
                await self.wait()
        with contextlib.suppress(OSError):
            self.fifo.unlink()

    def kill_sync(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)


class Zygote:
    """The process the spares are forked from: `python -m runtime.engines.guard python -m MODULE`
    (`runtime.engines.zygote`'s protocol)."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.log_path = log_path
        self.ready = asyncio.Event()
        self.import_cpu_s: float | None = None  # CPU seconds its import took (guard included)
        self._forks: dict[int, asyncio.Future[int]] = {}
        self._ids = itertools.count(1)
        self.spares: dict[int, Spare] = {}  # by guard pid, until their exit is reported
        self._reader = asyncio.create_task(self._read(), name=f"zygote-{proc.pid}")

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            async for line in self.proc.stdout:
                msg = json.loads(line)
                if msg.get("ready"):
                    self.import_cpu_s = group_cpu_s(self.pid)
                    self.ready.set()
                elif "exit" in msg:
                    spare = self.spares.pop(msg["exit"], None)
                    if spare is not None:
                        spare.exited(msg["code"])
                elif "fork" in msg:
                    fut = self._forks.pop(msg["fork"], None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg["pid"])
        except (ValueError, asyncio.IncompleteReadError) as exc:
            log.warning("zygote %d: unreadable line (%s); no more spares from it", self.pid, exc)
        finally:
            for fut in self._forks.values():
                if not fut.done():
                    fut.set_exception(BrokenPipeError(f"zygote {self.pid} is gone"))

    def alive(self) -> bool:
        return self.proc.returncode is None and not self._reader.done()

    def usable(self) -> bool:
        return self.ready.is_set() and self.alive()

    async def wait_ready(self) -> bool:
        """Until it is ready (True) or gone before that (False)."""
        ready = asyncio.ensure_future(self.ready.wait())
        try:
            await asyncio.wait({ready, self._reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        return self.usable()

    async def fork(self, fifo: Path, log_path: Path) -> Spare:
        """A new spare reading its command from `fifo` (created here) and writing to `log_path`."""
        assert self.proc.stdin is not None
        fid = next(self._ids)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._forks[fid] = fut
        with contextlib.suppress(FileNotFoundError):
            fifo.unlink()
        os.mkfifo(fifo, 0o600)
        req = {"fork": fid, "fifo": str(fifo), "log": str(log_path), "watch": os.getpid()}
        self.proc.stdin.write(json.dumps(req).encode() + b"\n")
        await self.proc.stdin.drain()
        pid = await asyncio.wait_for(fut, 30)
        spare = Spare(pid, fifo, log_path, self)
        self.spares[pid] = spare
        return spare

    def import_left_s(self, import_s: float) -> float:
        """CPU seconds of import it has left: 0 once ready; a dead one is replaced by a fresh
        import; one that used `import_s` already without being ready is near the end."""
        if self.usable():
            return 0.0
        if not self.alive():
            return import_s
        return max(0.1 * import_s, import_s - group_cpu_s(self.pid))

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGTERM)  # its guard takes it down, not its spares
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
                await self.proc.wait()
        await asyncio.gather(self._reader, return_exceptions=True)

    def kill_sync(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)


class SparePool:
    def __init__(self, size: int, log_dir: Path, env: Callable[[], dict[str, str]],
                 python: str = sys.executable, module: str = "runtime.engines.zygote") -> None:
        self.size = size
        self.module = module  # the zygote's `python -m` module (tests put a double here)
        self.log_dir = log_dir
        self._env = env  # the engines' environment without per-engine keys (engine.base_env)
        self.python = python
        self.zygote: Zygote | None = None
        self._spares: list[Spare] = []
        self._filling: asyncio.Task | None = None
        self._closed = False
        self._n = 0

    def import_s(self) -> float:
        """What an engine start without a ready spare costs more: the CPU time the zygote's import
        took, else IMPORT_S_GUESS."""
        z = self.zygote
        return z.import_cpu_s if z is not None and z.import_cpu_s else IMPORT_S_GUESS

    def import_left(self) -> tuple[float, ...]:
        """Per spare the pool keeps (`size` of them), the CPU seconds of import left before it can
        be handed out: 0 for a forked one, and for one still to be forked from a ready zygote;
        the zygote's import left while it imports."""
        work = self.import_s()
        left = work if self.zygote is None else self.zygote.import_left_s(work)
        return tuple(sorted([0.0] * len([s for s in self._spares if s.usable()])
                            + [left] * max(0, self.size - len(self._spares))))[:self.size]

    def ready_count(self) -> int:
        return sum(s.usable() for s in self._spares)

    def forks_ready(self) -> bool:
        """Whether the zygote is ready: then every start finds a spare (one is forked at once
        for each taken), and the planner prices every start as one in a spare."""
        return self.zygote is not None and self.zygote.usable()

    async def start(self) -> None:
        """Start the zygote (returns at once: it imports, then the spares are forked, in the
        background)."""
        await self._start_zygote()
        self.refill()

    async def _start_zygote(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"zygote-{os.getpid()}.log"
        with open(log_path, "ab") as logf:
            proc = await asyncio.create_subprocess_exec(
                self.python, "-m", "runtime.engines.guard", self.python, "-m", self.module,
                env=self._env(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=logf, start_new_session=True, preexec_fn=_spare_setup)
        self.zygote = Zygote(proc, log_path)
        log.info("spare zygote %d started (log %s)", proc.pid, log_path)

    async def _fill(self) -> None:
        for dead in [s for s in self._spares if not s.usable()]:
            self._spares.remove(dead)
            with contextlib.suppress(OSError):
                dead.fifo.unlink()
        if self.zygote is None or not self.zygote.alive():
            if self._closed:
                return
            await self._start_zygote()
        zygote = self.zygote
        assert zygote is not None
        if not await zygote.wait_ready():
            log.warning("spare zygote %d exited before it was ready; see %s", zygote.pid,
                        zygote.log_path)
            return
        while not self._closed and zygote.usable() and len(self._spares) < self.size:
            self._n += 1
            name = f"spare-{os.getpid()}-{self._n}"
            try:
                spare = await zygote.fork(self.log_dir / f"{name}.cmd", self.log_dir / f"{name}.log")
            except (OSError, asyncio.TimeoutError) as exc:
                log.warning("no spare forked: %s", exc)
                return
            self._spares.append(spare)
            log.info("spare engine process %d forked (log %s)", spare.pid, spare.log_path)

    def take(self) -> Spare | None:
        """A ready spare (removed from the pool), or None; then `refill()`."""
        for spare in self._spares:
            if spare.usable():
                self._spares.remove(spare)
                return spare
        return None

    def refill(self) -> None:
        """Fork replacements for spares taken or dead (in the background)."""
        if not self._closed and (self._filling is None or self._filling.done()):
            self._filling = asyncio.create_task(self._fill(), name="spare-fill")

    async def wait_ready(self, timeout_s: float) -> int:
        """Wait until every spare is ready (or `timeout_s`); returns how many are."""
        deadline = time.monotonic() + timeout_s
        while self.ready_count() < self.size and time.monotonic() < deadline:
            if self._filling is None or self._filling.done():
                self.refill()
            await asyncio.sleep(0.05)
        return self.ready_count()

    async def close(self) -> None:
        self._closed = True
        if self._filling is not None:
            self._filling.cancel()
            await asyncio.gather(self._filling, return_exceptions=True)
        spares, self._spares = self._spares, []
        await asyncio.gather(*(s.stop() for s in spares), return_exceptions=True)
        if self.zygote is not None:
            await self.zygote.stop()

    def kill_sync(self) -> None:
        for s in self._spares:
            s.kill_sync()
        if self.zygote is not None:
            self.zygote.kill_sync()
