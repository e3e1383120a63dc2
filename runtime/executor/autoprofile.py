"""Background profiling (`[scheduler] auto_profile = "idle"`): the executor's idle devices measure
the shapes the planner may choose that have no profile yet.

What: the shapes (model, TP, threads per rank) `latency_source.planner_shapes` gives the configured
models on this CPU pool, less those with a profile under `<state_dir>/profiles/`
(`runtime.persist.load_profile`: the reader `serve` and `samullm plan` plan with), fewest cores
first, one at a time. A run is `samullm profile --quick` of one shape (the command comes from the
composition root, `cli.serve`: the runtime does not import the tools); the profiler writes the
profile atomically at its very end, and the next plan reads it (profiles are cached by file stamp).

When: the executor says whether it is idle (no live batch at the gateway, none open in its pools,
no engine up or stopping). A run starts once idle held at two checks in a row, `IDLE_CHECK_S`
apart on the executor's clock (a client uploading its next batch right after one finished is not
raced), and the next shape follows at once while idle lasts. A batch arriving (`stop`, called
before anything else of the batch happens) kills the run at once: nothing of it is saved, and its
shape is profiled again at the next idle time. A run that fails is not tried again by this gateway.

How it stays out of the way: the run starts at nice 19 (its autogroup too, and so every session it
starts: the profiler's sweep worker and engine, `runtime.engines.engine.child_setup`), on the
shape's cores only when engines are confined, with the engines' environment. Its processes form a
tree of several sessions (the profiler, its sweep worker, the engine it times), so a stop freezes
the whole tree (SIGSTOP until no new process appears), SIGKILLs every process of it, and once they
are gone unlinks the /dev/shm names they held (`runtime.engines.shm`): no process, and no shared
memory, is left behind.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Protocol

from runtime.clock import Clock
from runtime.config import Config
from runtime.engines.devices import engine_device_kind
from runtime.engines.engine import base_env, child_setup
from runtime.engines.procs import freeze_tree, live_pids
from runtime.engines.shm import clear_unused, shm_names
from runtime.executor.latency_source import planner_shapes
from runtime.persist import load_profile
from scheduler.types import DevicePool, ModelSpec

log = logging.getLogger(__name__)
IDLE_CHECK_S = 5.0  # seconds between idle checks; a run starts after two idle checks in a row
NICE = 19
KEEP_EVENTS = 100


@dataclass(frozen=True)
class Shape:
    """One shape to profile: `threads` cores per rank on `devices` (tp × threads cores)."""

    model: str
    tp: int
    threads: int
    devices: tuple[int, ...]

    def describe(self) -> dict[str, Any]:
        return {"model": self.model, "tp": self.tp, "threads": self.threads,
                "devices": list(self.devices)}

    def cli_args(self) -> list[str]:
        """The shape as `samullm profile` options."""
        return ["--model", self.model, "--tp", str(self.tp), "--threads", str(self.threads),
                "--devices", ",".join(map(str, self.devices))]


def missing_shapes(cfg: Config, pool: DevicePool, specs: Mapping[str, ModelSpec],
                   state_dir: Path) -> list[Shape]:
    """The planner's shapes on `pool` of the generating models with weights that have no readable
    profile, fewest cores first (one core per rank is the base the others are derived from), then
    in the config's model order. None on GPUs: the profiler drives CPU engines only; none of an
    embedding model: it drives generation."""
    if engine_device_kind(pool.kind) != "cpu":
        return []
    order = {m.name: i for i, m in enumerate(cfg.models)}
    shapes = [Shape(m, tp, th, pool.ids[:tp * th]) for m, tp, th in planner_shapes(specs, pool)
              if (model := cfg.model(m)) is not None and model.path is not None
              and model.generates
              and load_profile(state_dir, m, tp, pool.signature, th) is None]
    return sorted(shapes, key=lambda s: (s.tp * s.threads, order[s.model], s.tp))


class ProfileRun(Protocol):
    """A started profiling run (`ProfileProcess`, or a test double)."""

    def kill(self) -> None:
        """End it now, synchronously: nothing of it is saved."""

    async def wait(self) -> int:
        """Its exit code, once it and everything it started are gone."""


ProfileLaunch = Callable[[Shape], Awaitable[ProfileRun]]


class ProfileProcess:
    """One profiling run as a process tree led by `argv(shape)` in a session of its own."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.proc, self.pid, self.log_path = proc, proc.pid, log_path
        self._frozen: list[int] = []
        self._shm: dict[str, int] = {}

    @staticmethod
    def launcher(argv: Callable[[Shape], list[str]], log_dir: Path,
                 confine: bool = True) -> ProfileLaunch:
        """Start `argv(shape)` at nice 19, on the shape's cores when `confine`, logging to
        `log_dir/auto-profile-<model>-tp<N>-t<T>.log`."""
        async def launch(shape: Shape) -> ProfileRun:
            log_dir.mkdir(parents=True, exist_ok=True)
            log_path = log_dir / f"auto-profile-{shape.model}-tp{shape.tp}-t{shape.threads}.log"
            with open(log_path, "ab") as out:
                proc = await asyncio.create_subprocess_exec(
                    *argv(shape), env=base_env(), stdin=asyncio.subprocess.DEVNULL, stdout=out,
                    stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                    preexec_fn=child_setup(NICE, shape.devices if confine else ()))
            return ProfileProcess(proc, log_path)
        return launch

    def kill(self) -> None:
        if self._frozen or self.proc.returncode is not None:
            return
        self._frozen = freeze_tree(self.pid)
        self._shm = shm_names(self._frozen)  # frozen processes still map theirs
        for pid in self._frozen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def wait(self) -> int:
        rc = await self.proc.wait()
        if self._frozen:
            while live_pids(self._frozen):  # SIGKILLed processes vanish within milliseconds
                await asyncio.sleep(0.02)
            cleared, _ = await asyncio.to_thread(clear_unused, self._shm)
            if cleared:
                log.info("auto-profile: unlinked %d names its run left in /dev/shm", len(cleared))
        return rc


class AutoProfiler:
    """Runs `launch` for each of `shapes()` while `idle()` holds (see the module docstring);
    `stop()` when a batch arrives. `events`: the newest auto_profile_* events, each also passed
    to `emit`."""

    def __init__(self, shapes: Callable[[], list[Shape]], launch: ProfileLaunch,
                 idle: Callable[[], bool], clock: Clock, emit: Callable[..., None]) -> None:
        self.shapes, self.launch, self.idle, self.clock, self.emit = (shapes, launch, idle,
                                                                      clock, emit)
        self.events: list[dict[str, Any]] = []
        self.run: ProfileRun | None = None
        self.shape: Shape | None = None
        self._started_at = 0.0
        self._stopped = False
        self._failed: set[Shape] = set()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="auto-profile")

    def stop(self) -> None:
        """A batch arrives: kill the run in progress now; its shape is tried at the next idle time."""
        if self.run is None or self.shape is None or self._stopped:
            return
        self._stopped = True
        self.run.kill()
        self._event("auto_profile_stopped", self.shape,
                    ran_s=round(self.clock.monotonic() - self._started_at, 2))

    async def close(self) -> None:
        run = self.run
        self.stop()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if run is not None:
            await run.wait()  # reaped: nothing of it outlives the executor

    def health(self) -> dict[str, Any]:
        """What `/health` shows: `state` profiling (with `shape`, `running_s`), waiting (for idle
        time) or done (no shape left to try); `missing` = shapes without a profile, `failed` =
        those of them whose run failed."""
        missing = self.shapes()
        out: dict[str, Any] = {"state": "waiting", "missing": len(missing)}
        if self.shape is not None and not self._stopped:
            out |= {"state": "profiling", "shape": self.shape.describe(),
                    "running_s": round(self.clock.monotonic() - self._started_at, 1)}
        elif all(s in self._failed for s in missing):
            out["state"] = "done"
        failed = sum(s in self._failed for s in missing)
        return out | ({"failed": failed} if failed else {})

    def _next(self) -> Shape | None:
        return next((s for s in self.shapes() if s not in self._failed), None)

    async def _loop(self) -> None:
        idle_checks = 0
        while True:
            await self.clock.sleep(IDLE_CHECK_S)
            idle_checks = idle_checks + 1 if self.idle() else 0
            while idle_checks >= 2 and self.idle():
                shape = self._next()
                if shape is None:
                    break
                await self._profile(shape)
            if not self.idle():
                idle_checks = 0

    async def _profile(self, shape: Shape) -> None:
        self.shape, self._stopped = shape, False
        self._started_at = self.clock.monotonic()
        try:
            try:
                self.run = await self.launch(shape)
            except OSError as exc:
                self._failed.add(shape)
                self._event("auto_profile_failed", shape, message=f"cannot start: {exc}")
                return
            self._event("auto_profile_started", shape,
                        **({"log": str(p)} if (p := getattr(self.run, "log_path", None)) else {}))
            if not self.idle():  # a batch arrived while it was being spawned
                self.stop()
            rc = await self.run.wait()
        finally:
            self.run = None
        seconds = round(self.clock.monotonic() - self._started_at, 2)
        self.shape = None
        if self._stopped:
            return
        if rc == 0 and shape not in self.shapes():
            self._event("auto_profile_done", shape, seconds=seconds)
        else:  # exited with an error, or without the profile: not tried again by this gateway
            self._failed.add(shape)
            self._event("auto_profile_failed", shape, exit_code=rc, seconds=seconds)

    def _event(self, kind: str, shape: Shape, **data: Any) -> None:
        self.events = [*self.events[-(KEEP_EVENTS - 1):],
                       {"event": kind, "shape": shape.describe(), **data}]
        self.emit(kind, shape=shape.describe(), **data)
