"""Engines on a Ray cluster (`[cluster] backend = "ray"`): the `Launcher` the executor is given then.

Each engine: a placement group of one bundle (its cores, or its GPUs) on its planned node, named
with this gateway's prefix (`runtime.engines.ray_cluster`), holding an `EngineHost` actor
(`runtime.engines.ray_host`) that spawns vLLM's OpenAI server on the node's own address, pinned to
the planned devices of that node. The gateway talks to it over HTTP as to a local engine: a
`RayEngine` is an `Engine` whose process is the actor's (`RemoteProcess`: polled, dead with the
actor), so health, requests and their errors are the local engine's code. Stopping it stops the
engine's group on its node, then kills the actor and removes the placement group.

Nodes: `connect()` joins the cluster and lays out its devices (`devices.ClusterLayout`: the pool);
`start()` removes the placement groups a predecessor on this state dir left, then reads the nodes
every `[cluster] node_poll_s` (and at once when an engine's actor died or its node was not found)
and tells `on_nodes` (the executor's `nodes_changed`) of each change. An engine whose node is gone
raises `NodeLost` (an engine death, not a failed start); an engine whose actor died exits with
code -9 (`RemoteProcess`), and the executor re-queues its requests as for any engine death.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from runtime.config import Config
from runtime.engines import ray_cluster
from runtime.engines.devices import ClusterLayout, NodeChange, Placed, discover_pool
from runtime.engines.engine import Engine, EngineError, EngineSpec, NodeLost, client_session
from runtime.engines.ray_host import EngineHost
from scheduler.types import DevicePool

log = logging.getLogger(__name__)
POLL_S = 0.5  # how often an engine's actor is asked whether its process still runs
PLACE_TIMEOUT_S = 60.0  # a placement group not placed by then: its node is gone or full
# an actor that died while its node still reads as alive: how long to wait for the node's death to
# be known before calling it the engine's own failure
SETTLE_S = 8.0


class RemoteProcess:
    """An engine's outer guard on its node, as `Engine` uses a local `asyncio.subprocess.Process`:
    `pid`, `returncode` (None while it runs; -9 once its actor is dead), `wait()`."""

    def __init__(self, actor: Any, pid: int, on_death: Callable[[], Any]) -> None:
        self.actor, self.pid = actor, pid
        self.returncode: int | None = None
        self._exited = asyncio.Event()
        self._on_death = on_death
        self._task = asyncio.create_task(self._watch(), name=f"ray-engine-{pid}")

    async def _watch(self) -> None:
        while self.returncode is None:
            try:
                code = await self.actor.poll.remote()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # RayActorError: the actor (or its node) is gone
                log.warning("engine %s: its Ray actor is gone (%s)", self.pid, type(exc).__name__)
                try:  # the nodes first: the re-plan must not use a lost node
                    await self._on_death()
                except Exception:
                    log.exception("cannot read the cluster's nodes")
                code = -9
            if code is not None:
                self.exited(code)
                return
            await asyncio.sleep(POLL_S)

    def exited(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
        self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def close(self) -> None:
        self._task.cancel()


class RayEngine(Engine):
    """An engine in a placement group on a cluster node (see the module docstring)."""

    def __init__(self, spec: EngineSpec, launcher: "RayLauncher", placed: Placed,
                 name: str) -> None:
        super().__init__(spec)
        self.launcher, self.placed, self.name = launcher, placed, name
        self.node = placed.node
        self._pg: Any = None
        self._actor: Any = None

    @property
    def freezable(self) -> bool:
        """Its processes are on its node, behind the host actor: it is stopped, not put to sleep
        (a freeze through the actor is not built)."""
        return False

    async def start(self, timeout_s: float = 300, spare: Any = None) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if self._proc is not None:
            raise RuntimeError("engine already started")
        t0 = time.monotonic()
        # the node's own devices; paths absolute (the same on every node, not the gateway's cwd)
        local = EngineSpec(**{**self.spec.__dict__,
                              "devices": self.placed.local(self.spec.devices),
                              "model_path": Path(self.spec.model_path).resolve(),
                              "log_path": self.spec.log_path and Path(self.spec.log_path).resolve()})
        gpus = len(local.devices) if local.device_kind == "cuda" else 0
        cpus = 0 if gpus else len(local.devices)
        try:
            self._pg = await asyncio.to_thread(ray_cluster.placement, self.name,
                                               self.node.node_id,
                                               {"GPU": gpus} if gpus else {"CPU": cpus})
            await self.launcher.placed_in_time(self._pg, self.node.node_id, self.name)
            host = ray.remote(EngineHost).options(
                num_cpus=cpus, num_gpus=gpus, max_restarts=0, name=self.name,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, 0))
            self._actor = host.remote()
            nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + self.spec.nice)
            info = await self._actor.start.remote(local, nice)
        except asyncio.CancelledError:
            await self.stop()
            raise
        except NodeLost:
            await self.stop()
            raise
        except Exception as exc:  # the actor died while starting: its node went away, or worse
            await self.stop()
            await self._raise_if_node_lost(exc)
            raise EngineError(f"engine {self.spec.model.name!r} could not be placed on node "
                              f"{self.node.address}: {type(exc).__name__}: {exc}") from exc
        self.base_url, self.pid = info["url"], info["pid"]
        self._proc = RemoteProcess(self._actor, self.pid, self.launcher.refresh)  # type: ignore
        self._session = client_session()
        try:
            await self._wait_healthy(t0 + timeout_s)
        except EngineError as exc:
            await self.stop()
            await self._raise_if_node_lost(exc)
            raise
        except BaseException:
            await self.stop()
            raise
        self.start_time_s = time.monotonic() - t0

    async def _raise_if_node_lost(self, exc: BaseException) -> None:
        """A start that failed because its node left is NodeLost (an engine death for the
        executor), not the model's failure."""
        if not await self.launcher.node_alive(self.node.node_id, SETTLE_S):
            raise NodeLost(f"node {self.node.node_id[:12]} ({self.node.address}) left while "
                           f"engine {self.spec.model.name!r} started there") from exc

    async def stop(self, timeout_s: float = 30) -> None:
        """Stop the engine's group on its node, kill the actor, remove the placement group;
        idempotent, and quiet when the node is gone already."""
        import ray

        if self._stopped:
            return
        self._stopped = True
        if self._session is not None:
            await self._session.close()
        proc = self._proc
        if self._actor is not None:
            try:
                code = await asyncio.wait_for(self._actor.stop.remote(timeout_s), timeout_s + 15)
            except Exception:  # the actor or its node is gone: its guards took the engine down
                code = -9
            if isinstance(proc, RemoteProcess):
                proc.exited(code if code is not None else -9)
                proc.close()
            try:
                ray.kill(self._actor)
            except Exception:
                pass
        if self._pg is not None:
            try:
                await asyncio.to_thread(ray_cluster.remove_group, self.name)
            except Exception as exc:
                log.warning("cannot remove placement group %s: %s", self.name, exc)

    def log_tail(self, nbytes: int = 6000) -> str:
        text = super().log_tail(nbytes)  # the same path on this machine when it is the node's
        if text or self._actor is None:
            return text
        import ray

        try:
            return ray.get(self._actor.log_tail.remote(nbytes), timeout=5)
        except Exception:
            return ""

    def __repr__(self) -> str:
        return (f"RayEngine({self.spec.model.name!r}, devices={self.spec.devices}, "
                f"node={self.node.address}, pid={self.pid}, url={self.base_url!r})")


class RayLauncher:
    """The launcher of engines on a Ray cluster (module docstring). `on_nodes` is told of every
    change of the cluster's nodes, the first read included (`start()`)."""

    spares = None  # spare engine processes are a local-machine thing
    freezable = False  # `RayEngine.freezable`

    def __init__(self, cfg: Config, start_timeout_s: float = 300) -> None:
        self.cfg = cfg
        self.start_timeout_s = start_timeout_s
        self.layout = ClusterLayout()
        self.prefix = ray_cluster.gateway_prefix(cfg.state_dir)
        self.on_nodes: Callable[[NodeChange], None] | None = None
        self._names = itertools.count(1)
        self._refresh = asyncio.Lock()
        self._watch: asyncio.Task | None = None
        self._first: NodeChange | None = None

    def connect(self) -> DevicePool:
        """Join the cluster and lay out its nodes (blocking); the pool to plan on."""
        ray_cluster.connect(self.cfg.cluster)
        self._first = self.layout.update(ray_cluster.read_nodes(), self.cfg)
        return discover_pool(self.cfg, self.layout)

    def nodes(self) -> list[dict[str, Any]]:
        return [p.describe() for p in self.layout.placed.values()]

    async def start(self) -> None:
        if self._first is None:
            await asyncio.to_thread(self.connect)
        reaped = await asyncio.to_thread(ray_cluster.reap, self.prefix)
        if reaped:
            log.info("removed %d placement groups an earlier gateway left: %s", len(reaped),
                     " ".join(reaped))
        if self._first is not None and self.on_nodes is not None:
            self.on_nodes(self._first)
        self._watch = asyncio.create_task(self._watch_nodes(), name="ray-nodes")

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)

    async def _watch_nodes(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.cluster.node_poll_s)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("cannot read the cluster's nodes")

    async def refresh(self) -> None:
        """Read the nodes now; tell `on_nodes` when they changed."""
        async with self._refresh:
            nodes = await asyncio.to_thread(ray_cluster.read_nodes)
            change = self.layout.update(nodes, self.cfg)
        if (change.joined or change.left) and self.on_nodes is not None:
            self.on_nodes(change)

    async def node_alive(self, node_id: str, settle_s: float = 0.0) -> bool:
        """Whether `node_id` is among the cluster's nodes after a fresh read; with `settle_s`, read
        again for that long while it is (a dead actor's node may be known dead a moment later)."""
        deadline = time.monotonic() + settle_s
        while True:
            await self.refresh()
            if node_id not in self.layout.placed:
                return False
            if time.monotonic() >= deadline:
                return True
            await asyncio.sleep(1.0)

    async def placed_in_time(self, pg: Any, node_id: str, name: str) -> None:
        """Wait until `pg` is placed; NodeLost when its node left meanwhile."""
        deadline = time.monotonic() + PLACE_TIMEOUT_S
        ready = asyncio.wrap_future(pg.ready().future())
        while True:
            done, _ = await asyncio.wait({ready}, timeout=2.0)
            if done:
                ready.result()
                return
            if not await self.node_alive(node_id):
                raise NodeLost(f"node {node_id[:12]} left before placement group {name} was "
                               "placed")
            if time.monotonic() > deadline:
                raise EngineError(f"placement group {name} not placed on node {node_id[:12]} "
                                  f"in {PLACE_TIMEOUT_S:.0f} s (its resources are taken?)")

    def in_spare(self, spec: EngineSpec) -> bool:
        return False  # no spares on a cluster

    async def launch(self, spec: EngineSpec) -> Engine:
        placed = self.layout.locate(spec.devices)
        if placed is None:
            await self.refresh()
            raise NodeLost(f"devices {list(spec.devices)} are on no node of the cluster now")
        name = f"{self.prefix}{spec.model.name}-{next(self._names)}-{int(time.time())}"
        engine = RayEngine(spec, self, placed, name)
        await engine.start(self.start_timeout_s)
        return engine
