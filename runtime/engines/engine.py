"""One vLLM engine = one `vllm.entrypoints.openai.api_server` process group on a loopback port.

Why a server process and not an in-process `AsyncLLM`: its response bodies are exactly vLLM's (batch
output lines carry them verbatim), it validates request bodies like vLLM's server, it aborts a request
when the HTTP connection closes (so cancelling `Engine.post` aborts the work), it has `/health`, and a
crash stays in its own process.

Process hygiene (the invariant the tests check): each engine runs in its own session/process group;
`stop()` SIGTERMs the group (vLLM then shuts its engine-core and worker processes down and Python's
resource tracker, one of the group, unlinks their shared memory), SIGKILLs whatever is left after
the timeout and unlinks the `/dev/shm` names the group had mapped or open. The group leader is
`runtime.engines.guard` (PR_SET_PDEATHSIG + parent watch): a SIGKILLed parent still takes its engines
down, even mid-start, and the guard unlinks what its group left in /dev/shm; an atexit hook stops
engines left running at interpreter exit. Should the guard be killed too, the names stay: so once an
engine is up, the names it holds are recorded under the launcher's state dir (`runtime.engines.shm`), the
record is dropped when it has stopped, and a restarted gateway's `VllmLauncher.start()` clears what
the records of its predecessor still name.

Sleep on CPU (`freeze`/`thaw`): every process of the group but the guard is stopped with SIGSTOP,
so the engine uses no core and keeps its memory (weights, KV cache, its port); SIGCONT resumes it
where it was, its connections and vLLM's shared-memory queues included (a tiny `small` engine,
frozen 20 s, answered its next request in 0.08 s, 5 Dec 2026). A frozen process acts on a SIGTERM
only once it runs again, so every stop sends SIGCONT after it.

Long: one engine process's whole life (command line, spawn in a spare or fresh, health, stop,
reap, /dev/shm records) and the launcher that makes them; the process helpers already live in
`runtime.engines.procs`.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import aiohttp

from runtime.config import ModelConfig
from runtime.engines.api_server import ENGINE_MAIN, FORK_ENV
from runtime.engines.procs import group_pids, pss_bytes, set_autogroup_nice, set_pdeathsig
from runtime.engines.shm import RECORD_DIR, SHM_DIR, clear_records, clear_unused, save_record, shm_names

if TYPE_CHECKING:
    from runtime.engines.spares import Spare, SparePool

log = logging.getLogger(__name__)
# how often a starting engine's /health is asked: a refused connect costs ~1 ms of CPU, and a
# start is measured (and planned from) in these steps (at 0.5 s, starts read 3.52, 4.02 … 7.03 s)
HEALTH_POLL_S = 0.05
LOG_TAIL_BYTES = 6000


class EngineError(RuntimeError):
    """The engine failed to start; the message carries the tail of its log."""


class EngineDied(EngineError):
    """The engine process exited (or refused connections) while it was supposed to be running."""


class NodeLost(EngineDied):
    """The engine's cluster node is gone (it left, or the node it was planned on was): an engine
    death for the executor, even while starting, never a failed start of its model."""


@dataclass(frozen=True)
class EngineSpec:
    model: ModelConfig
    model_path: Path
    devices: tuple[int, ...]  # CPU core ids or GPU ids; for CPU TP, split evenly across ranks
    device_kind: str = "cpu"  # "cpu" | "cuda"
    tp: int = 1
    kv_cache_gib: float = 1.0  # CPU: KV cache bytes per rank (--kv-cache-memory-bytes)
    gpu_memory_utilization: float = 0.9
    log_path: Path | None = None
    nice: int = 0  # added to the engine processes' niceness (see `[devices] engine_nice`)
    # CPU: every process of the engine runs on `devices` only (see `confined_cores`)
    confine: bool = True

    @property
    def threads(self) -> int:
        """Devices per rank: CPU cores each rank runs on (1 on GPUs, one device per rank)."""
        return max(1, len(self.devices) // max(1, self.tp))

    def confined_cores(self) -> tuple[int, ...]:
        """The CPU affinity of the whole engine, () = unrestricted. VLLM_CPU_OMP_THREADS_BIND pins
        only the workers' OpenMP threads; the API server and the engine-core process (which waits
        for its workers by spinning on sched_yield) would otherwise run on every core, so a
        "one-core" engine used ~1.4 cores here and, on a kernel without preemption
        (PREEMPT_NONE), stalled every other process of the machine for 0.2-0.6 s at a time
        (the gateway's API, other engines)."""
        return tuple(self.devices) if self.device_kind == "cpu" and self.confine else ()


def cpu_bind_string(devices: tuple[int, ...], tp: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND: cores of one rank as ranges ("0-3,6"), ranks separated by '|'."""
    if not devices or len(devices) % tp:
        raise ValueError(f"{len(devices)} cores cannot be split evenly over tp={tp}")
    per = len(devices) // tp
    ranks = [sorted(devices[r * per:(r + 1) * per]) for r in range(tp)]
    return "|".join(_ranges(r) for r in ranks)


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out: list[str] = []
    start = prev = ids[0]
    for cur in ids[1:] + [-2]:
        if cur == prev + 1:
            prev = cur
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = cur
    return ",".join(out)


def _flag(key: str, value: Any) -> list[str]:
    """One engine arg as CLI tokens: True → --flag, False → --no-flag, lists → repeated values."""
    name = "--" + key.replace("_", "-")
    if value is True:
        return [name]
    if value is False:
        return ["--no-" + key.replace("_", "-")]
    if isinstance(value, (list, tuple)):
        return [name, *map(str, value)]
    if isinstance(value, dict):
        return [name, json.dumps(value)]
    return [name, str(value)]


def build_command(spec: EngineSpec, port: int, python: str = sys.executable,
                  host: str = "127.0.0.1") -> tuple[list[str], dict]:
    """The api_server command line and environment for `spec` (pure; exposed for tests/diagnostics).
    `host`: the address it listens on (loopback here; a cluster node's own address there)."""
    m = spec.model
    args: dict[str, Any] = {
        "model": str(spec.model_path),
        "served_model_name": m.name,
        "host": host,
        "port": port,
        "dtype": m.dtype,
        "max_model_len": m.max_model_len,
        "max_num_seqs": m.max_num_seqs,
        "max_num_batched_tokens": m.max_num_batched_tokens,
        "tensor_parallel_size": spec.tp,
        # vLLM's default, said aloud: the planner simulates the prefix cache (`SimRequest.prefix`);
        # a model's engine_args may turn it off (`ModelConfig.prefix_caching`).
        "enable_prefix_caching": True,
        # usage.prompt_tokens_details.cached_tokens in every response, as OpenAI reports it: the
        # hits a user sees, and what the planner's simulated hit rate is checked against
        "enable_prompt_tokens_details": True,
        "disable_log_stats": True,
        "disable_uvicorn_access_log": True,
        # an engine holds more requests than it runs (`runtime.executor.slots.INFLIGHT_FACTOR`);
        # those wait in its own queue, ordered by each request's `priority` (the gateway's fair
        # turns: `runtime.executor.queues`), not by arrival behind a big batch's
        "scheduling_policy": "priority",
    }
    env = base_env()
    if spec.device_kind == "cpu":
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind_string(spec.devices, spec.tp)
        args["kv_cache_memory_bytes"] = int(spec.kv_cache_gib * (1 << 30))
        if spec.tp > 1:
            args["distributed_executor_backend"] = "mp"
        if spec.threads == 1:  # one core per rank: fork, don't re-import (api_server)
            env[FORK_ENV] = "1"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, spec.devices))
        args["gpu_memory_utilization"] = spec.gpu_memory_utilization
    args.update(m.engine_args)  # the config's extra args win
    # runtime.engines.guard leads the process group and takes it down if this process dies.
    cmd = [python, "-m", "runtime.engines.guard", python, "-m", ENGINE_MAIN]
    for key, value in args.items():
        if value is not None:
            cmd += _flag(key, value)
    return cmd, env


def base_env() -> dict[str, str]:
    """The environment every engine gets, before its per-engine keys (devices); a spare engine
    process (`runtime.engines.spares`) is started with it."""
    env = dict(os.environ)
    env.update({
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
    })
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    env.pop(FORK_ENV, None)  # build_command decides it per engine
    # VLLM_CPU_KVCACHE_SPACE only takes whole GiB (and overrides the flag); the flag is exact.
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_setup(nice: int, cores: tuple[int, ...] = ()) -> Callable[[], None]:
    """preexec_fn for an engine (and for a profiling run, `runtime.executor.autoprofile`, and its
    workers): parent-death signal, then the niceness and the CPU affinity every process of the
    engine inherits (the engine is throughput work; the gateway's event loop must win a contended
    core, and an engine keeps to the cores the plan gave it). A new session's autogroup takes the
    niceness the process ends up with, so a child that starts a session of its own keeps its
    parent's priority (a profiling run at 19 starts its sweep worker and engine that way)."""
    def setup() -> None:
        set_pdeathsig()
        if nice:
            os.nice(nice)
        set_autogroup_nice(os.getpriority(os.PRIO_PROCESS, 0))
        if cores:
            os.sched_setaffinity(0, cores)
    return setup


def shm_files(pids: list[int]) -> set[str]:
    """Paths of the /dev/shm files mapped or open in `pids` (`runtime.engines.shm.shm_names`)."""
    return {str(SHM_DIR / name) for name in shm_names(pids)}


def read_tail(path: Path | None, nbytes: int = LOG_TAIL_BYTES) -> str:
    """The last `nbytes` of a log file as text ("" when there is none)."""
    try:
        with open(path, "rb") as f:  # type: ignore[arg-type]
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - nbytes))
            return f.read().decode(errors="replace")
    except (OSError, TypeError):
        return ""


def client_session() -> aiohttp.ClientSession:
    """The HTTP session requests to one engine go through."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
        # vLLM's server (uvicorn) closes idle keep-alive connections after 5 s
        # (VLLM_HTTP_TIMEOUT_KEEP_ALIVE); aiohttp keeps them 15 s by default and would reuse one
        # the server has just closed ("Server disconnected"). Drop ours first.
        connector=aiohttp.TCPConnector(limit=1024, keepalive_timeout=2.0),
    )


_LIVE: "weakref.WeakSet[Engine]" = weakref.WeakSet()


class Engine:
    """A started (or startable) vLLM server for one `EngineSpec`. Not reusable after `stop()`."""

    def __init__(self, spec: EngineSpec, python: str = sys.executable,
                 shm_record_dir: Path | None = None) -> None:
        self.spec = spec
        self.python = python
        self.port = 0
        self.base_url = ""
        self.pid: int | None = None
        self.log_path = spec.log_path
        self.start_time_s: float | None = None  # seconds from spawn to healthy
        self.spare_used = False  # started in a spare process (runtime.engines.spares): no API-server import
        self._proc: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None
        self._shm: dict[str, int] = {}  # /dev/shm name -> inode its group held (runtime.engines.shm)
        self._shm_record_dir = shm_record_dir
        self._shm_record: Path | None = None
        self._stopped = False
        self.frozen = False  # asleep on CPU: its processes stopped (see the module docstring)

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self, timeout_s: float = 300, spare: "Spare | None" = None) -> None:
        """Spawn the server (or turn `spare`, a `runtime.engines.spares.Spare`, into it) and wait
        until /health answers 200. Raises EngineError (log tail)."""
        if self._proc is not None:
            raise RuntimeError("engine already started")
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"engine-{self.spec.model.name}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        cmd, env = build_command(self.spec, self.port, self.python)
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            where = f" (in spare process {spare.pid})" if spare is not None else ""
            log.write(("$ " + " ".join(cmd) + where + "\n").encode())
            log.flush()
            if spare is not None:
                # the spare waits at nice 19; it takes the niceness a spawned engine would have
                nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + self.spec.nice)
                try:
                    self._proc = await spare.adopt(cmd, env, self.spec.confined_cores(), nice,
                                                   self.log_path)
                except OSError:  # it died since it was taken (broken pipe): spawn instead
                    log.write(b"spare process gone; spawning the engine\n")
                    spare = None
            if spare is None:
                self._proc = await asyncio.create_subprocess_exec(
                    *cmd, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log,
                    stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                    preexec_fn=child_setup(self.spec.nice, self.spec.confined_cores()),
                )
        self.spare_used = spare is not None
        self.pid = self._proc.pid
        _LIVE.add(self)
        self._session = client_session()
        try:
            await self._wait_healthy(t0 + timeout_s)
        except BaseException:
            await self.stop()
            raise
        self.start_time_s = time.monotonic() - t0
        # healthy = initialised: vLLM's message queues and TP buffers exist by now
        await asyncio.to_thread(self._record_shm)

    def _record_shm(self) -> None:
        assert self.pid is not None
        self._shm.update(shm_names(group_pids(self.pid)))
        if self._shm_record_dir is None or not self._shm:
            return
        try:
            self._shm_record = save_record(self._shm_record_dir, self.pid, self._shm,
                                           self._shm_record)
        except OSError as exc:  # a full disk must not fail the engine; only a restart reads it
            log.warning("cannot record the shared memory of engine %d: %s", self.pid, exc)

    def _clear_shm(self) -> None:
        """Once the group is gone: unlink what it left (a clean stop leaves nothing) and drop the
        record, or keep in it the names another live process still holds."""
        cleared, held = clear_unused(self._shm)
        if cleared:
            log.info("engine %s: unlinked %d names it left in /dev/shm: %s", self.pid,
                     len(cleared), " ".join(cleared))
        if self._shm_record is not None:
            try:
                if held:
                    save_record(self._shm_record_dir, self.pid, held, self._shm_record)
                else:
                    self._shm_record.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("cannot update shared-memory record %s: %s", self._shm_record, exc)

    async def _wait_healthy(self, deadline: float) -> None:
        assert self._proc is not None and self._session is not None
        while True:
            if self._proc.returncode is not None:
                raise EngineError(f"engine {self.spec.model.name!r} exited with code "
                                  f"{self._proc.returncode} while starting; log "
                                  f"{self.log_path}:\n{self.log_tail()}")
            try:
                async with self._session.get(self.base_url + "/health",
                                             timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise EngineError(f"engine {self.spec.model.name!r} not healthy in time; log "
                                  f"{self.log_path}:\n{self.log_tail()}")
            await asyncio.sleep(HEALTH_POLL_S)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None and not self._stopped

    async def wait_exit(self) -> int:
        assert self._proc is not None, "engine not started"
        return await self._proc.wait()

    async def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM the process group, SIGKILL what is left after `timeout_s`; idempotent."""
        if self._stopped or self._proc is None:
            self._stopped = True
            return
        self._stopped = True
        _LIVE.discard(self)
        if self._session is not None:
            await self._session.close()
        pgid = self._proc.pid
        self._shm.update(shm_names(group_pids(pgid)))
        _signal_group(pgid, signal.SIGTERM)
        _signal_group(pgid, signal.SIGCONT)  # a frozen engine acts on its SIGTERM only when running
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.returncode is not None and not group_pids(pgid):
                break
            await asyncio.sleep(0.1)
        else:
            self._shm.update(shm_names(group_pids(pgid)))
            _signal_group(pgid, signal.SIGKILL)
        await self._proc.wait()
        while group_pids(pgid):  # SIGKILLed processes vanish within milliseconds
            await asyncio.sleep(0.05)
        await asyncio.to_thread(self._clear_shm)

    def kill_sync(self) -> None:
        """Best-effort synchronous stop (atexit): SIGTERM, a short grace period, SIGKILL."""
        if self._proc is None or self._stopped:
            return
        self._stopped = True
        pgid = self._proc.pid
        self._shm.update(shm_names(group_pids(pgid)))
        _signal_group(pgid, signal.SIGTERM)
        _signal_group(pgid, signal.SIGCONT)
        deadline = time.monotonic() + 5
        while group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal_group(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 2
        while group_pids(pgid) and time.monotonic() < deadline:  # dying ones still map theirs
            time.sleep(0.02)
        self._clear_shm()

    # -- sleep on CPU (see the module docstring) ------------------------------------------------
    @property
    def freezable(self) -> bool:
        """Whether it can sleep frozen: a CPU engine whose processes are on this machine."""
        return self.spec.device_kind == "cpu"

    def _engine_pids(self) -> list[int]:
        """Its processes but the guard (which keeps watching the gateway while they sleep)."""
        assert self.pid is not None
        return [pid for pid in group_pids(self.pid) if pid != self.pid]

    def memory_bytes(self) -> int:
        """What its processes hold in memory (proportional set size), what it keeps asleep."""
        return pss_bytes(self._engine_pids()) if self.alive() else 0

    def freeze(self) -> bool:
        """Stop its processes (SIGSTOP); False when it is not running."""
        if not self.alive():
            return False
        for pid in self._engine_pids():
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        self.frozen = True
        return True

    def pin(self, cores: tuple[int, ...]) -> None:
        """Keep every thread of its processes but the guard's on `cores` (a guest served beside
        another stage's engine, `guests.Guests.visit`, and back home after)."""
        for pid in self._engine_pids():
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                try:
                    os.sched_setaffinity(int(tid), cores)
                except OSError:  # gone since
                    pass

    def thaw(self) -> bool:
        """Resume its processes (SIGCONT); whether it is still running."""
        if self._proc is not None:
            _signal_group(self._proc.pid, signal.SIGCONT)
        self.frozen = False
        return self.alive()

    # -- requests ------------------------------------------------------------------------------
    async def post(self, url: str, body: dict) -> tuple[int, dict]:
        """POST `body` to `url` ("/v1/chat/completions", ...); returns (status, JSON body), 4xx
        included. Raises EngineDied when the server is gone. Cancelling the caller's task closes
        the connection, which makes vLLM abort the request."""
        if self._session is None or self._proc is None:
            raise EngineDied("engine not started")
        try:
            async with self._session.post(self.base_url + url, json=body) as r:
                try:
                    data = await r.json(content_type=None)
                except ValueError:
                    data = {"error": {"message": (await r.text())[:2000], "type": "engine_error"}}
                return r.status, data
        except (aiohttp.ClientConnectionError, RuntimeError) as exc:
            # RuntimeError: the session was closed by stop() under us.
            if not self.alive() or isinstance(exc, aiohttp.ClientConnectorError):
                raise EngineDied(f"engine {self.spec.model.name!r} is gone: {exc}") from exc
            raise

    def log_tail(self, nbytes: int = LOG_TAIL_BYTES) -> str:
        return read_tail(self.log_path, nbytes)

    def __repr__(self) -> str:
        return (f"Engine({self.spec.model.name!r}, devices={self.spec.devices}, tp={self.spec.tp}, "
                f"pid={self.pid}, url={self.base_url!r})")


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


_POOLS: "weakref.WeakSet[SparePool]" = weakref.WeakSet()


@atexit.register
def kill_all_engines() -> None:
    """Stop every engine (and spare) this process started and has not stopped (atexit, signal
    handlers)."""
    for engine in list(_LIVE):
        engine.kill_sync()
    for pool in list(_POOLS):
        pool.kill_sync()


class Launcher(Protocol):
    """What the executor needs of a launcher (`VllmLauncher`, or a test double)."""

    spares: "SparePool | None"  # spare engine processes it starts engines in (CPU), if any
    freezable: bool  # its CPU engines can sleep frozen (`Engine.freezable`)

    async def start(self) -> None:
        """Before the first launch: clear what a killed predecessor left, start the spares."""

    async def launch(self, spec: EngineSpec) -> Engine:
        """Return a started, healthy engine for `spec` (raises EngineError). The engine's
        `start_time_s` (spawn to healthy) and `spare_used` are set."""

    def in_spare(self, spec: EngineSpec) -> bool:
        """Whether the engine being launched for `spec` started in a spare process (while its
        launch runs; a re-plan then knows whether it still imports the API server)."""

    async def close(self) -> None:
        """After the last engine stopped: stop the spares."""


class VllmLauncher:
    """The real launcher: `Engine(spec).start()`; log files go under `log_dir` when given. With
    `spares` (CPU), an engine starts in a ready spare process when there is one. With `state_dir`,
    its engines' /dev/shm names are recorded under `<state_dir>/engines/`, and `start()` clears
    what the records of an earlier gateway on that state dir still name (`runtime.engines.shm`)."""

    def __init__(self, log_dir: Path | None = None, start_timeout_s: float = 300,
                 python: str = sys.executable, spares: "SparePool | None" = None,
                 state_dir: Path | None = None) -> None:
        self.log_dir = log_dir
        self.start_timeout_s = start_timeout_s
        self.python = python
        self.freezable = True  # its engines' processes are on this machine
        self.spares = spares
        self._in_spare: set[int] = set()  # id() of the specs being launched in a spare
        self.shm_records = Path(state_dir) / RECORD_DIR if state_dir is not None else None
        if spares is not None:
            _POOLS.add(spares)

    async def start(self) -> None:
        if self.shm_records is not None:
            cleared = await asyncio.to_thread(clear_records, self.shm_records)
            if cleared:
                log.info("unlinked %d names an earlier gateway's engines left in /dev/shm: %s",
                         len(cleared), " ".join(cleared))
        if self.spares is not None:
            await self.spares.start()

    async def close(self) -> None:
        if self.spares is not None:
            await self.spares.close()

    async def launch(self, spec: EngineSpec) -> Engine:
        asked = id(spec)  # the caller's spec (`in_spare`), before a log path is filled in
        if spec.log_path is None and self.log_dir is not None:
            devs = "-".join(map(str, spec.devices))
            name = f"{spec.model.name}-tp{spec.tp}-d{devs}-{int(time.time() * 1000)}.log"
            spec = EngineSpec(**{**spec.__dict__, "log_path": self.log_dir / name})
        engine = Engine(spec, python=self.python, shm_record_dir=self.shm_records)
        spare = self.spares.take() if self.spares is not None and spec.device_kind == "cpu" else None
        if spare is not None:
            self._in_spare.add(asked)
            self.spares.refill()  # a fork: ready for the next start at once, and costs no CPU
        try:
            await engine.start(self.start_timeout_s, spare=spare)
        finally:
            self._in_spare.discard(asked)
        return engine

    def in_spare(self, spec: EngineSpec) -> bool:
        return id(spec) in self._in_spare
