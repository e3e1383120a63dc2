"""Device discovery: which CPU cores or GPUs a plan may use, their memory and their topology.

CPU: a device is a core this process may run on (`os.sched_getaffinity`); its "memory" is the KV cache
space one engine gets (`[devices].cpu_kvcache_gib`). CUDA: GPUs seen by NVML (pynvml, the `gpu` extra),
their memory, and NVLink-connected groups (a TP group never spans two groups). `[devices]` overrides what
is detected: `ids` restricts, `topology_groups` replaces the detected groups, `memory_gib` the memory.

A Ray cluster (`[cluster] backend = "ray"`): the pool is the cluster's nodes (`Node`, read by
`runtime.engines.ray_cluster`) laid out by a `ClusterLayout`: each node's cores (or GPUs) are one
topology group, so a TP group never crosses a node while DP replicas may; a node's devices get
global ids on first sight, kept while it stays (a running engine's ids keep their meaning when
other nodes join or leave) and never reused for another node.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from runtime.config import Config, ConfigError
from scheduler.types import DevicePool, default_start_contention

GiB = 1 << 30
GPU_MEMORY_GIB = {"a100": 80, "h100": 80}  # `samullm plan`'s GPU presets (no NVML to ask)
_PRESET = re.compile(r"^(a100|h100)x(\d+)(-nvlink-pairs)?$")
_NODES = re.compile(r"^(\d+)x(a100|h100|cpu)x(\d+)$")  # N nodes of M devices: a cluster's pool


def start_contention(cfg: Config, pool_kind: str) -> float:
    """β of a pool: `[devices] start_contention`, else the pool kind's default."""
    beta = cfg.devices.start_contention
    return default_start_contention(pool_kind) if beta is None else float(beta)


def max_threads(cfg: Config, cores: int) -> int:
    """Most cores one CPU rank may use: `[devices] max_threads_per_rank`, 0 = every core."""
    limit = cfg.devices.max_threads_per_rank
    return max(1, min(cores, limit) if limit else cores)


def engine_device_kind(pool_kind: str) -> str:
    """The engine launcher's device kind for a pool kind ("cpu" stays, any GPU kind is "cuda")."""
    return "cpu" if pool_kind == "cpu" else "cuda"


def discover_pool(cfg: Config, layout: "ClusterLayout | None" = None) -> DevicePool:
    """The devices `serve` plans on: this machine's ([devices]), or with `[cluster] backend =
    "ray"` the cluster's nodes as `layout` (the Ray launcher's) has them now."""
    if cfg.cluster.backend == "ray":
        if layout is None:
            raise ConfigError("cluster.backend: \"ray\" pools come from the cluster's nodes "
                              "(runtime.engines.ray_launcher.RayLauncher.connect)")
        return layout.pool(cfg)
    d = cfg.devices
    kind = d.kind
    gpus = _nvml_gpus() if kind in ("auto", "cuda") else None
    if kind == "auto":
        kind = "cuda" if gpus else "cpu"
    if kind == "cuda":
        if not gpus:
            raise ConfigError("devices.kind: 'cuda' but no GPU found through NVML (pip install pynvml)")
        return _gpu_pool(cfg, gpus)
    found = sorted(os.sched_getaffinity(0))
    ids = _restrict(found, d.ids, "cores this process may use")
    memory = int((d.memory_gib or d.cpu_kvcache_gib) * GiB)
    return DevicePool("cpu", tuple(ids), memory, _groups(d.topology_groups, ids),
                      start_contention(cfg, "cpu"), max_threads(cfg, len(ids)))


@dataclass(frozen=True)
class Node:
    """One node of a cluster as the gateway uses it: `devices` are its own ids (the cores an
    engine there is pinned to, or its GPU indices), `address` the IP its engines listen on."""

    node_id: str
    address: str
    kind: str  # "cpu" or a GPU kind ("a100", ...; "cuda" when unknown)
    devices: tuple[int, ...]


@dataclass(frozen=True)
class Placed:
    """A node and the pool's ids of its devices (`ids[i]` is `node.devices[i]`)."""

    node: Node
    ids: tuple[int, ...]

    def local(self, ids: Iterable[int]) -> tuple[int, ...]:
        """The node's own ids of pool ids `ids` (all on this node)."""
        where = {g: i for i, g in enumerate(self.ids)}
        return tuple(self.node.devices[where[g]] for g in ids)

    def describe(self) -> dict[str, Any]:
        return {"node": self.node.node_id, "address": self.node.address,
                "device_kind": self.node.kind, "devices": list(self.ids),
                "local_devices": list(self.node.devices)}


@dataclass(frozen=True)
class NodeChange:
    """What a read of the cluster's nodes changed: the pool to plan on from now, the nodes that
    joined and left (with the ids they had), every node now, and those of another kind than the
    pool's (not used: one pool has one device kind)."""

    pool: DevicePool
    joined: tuple[Placed, ...]
    left: tuple[Placed, ...]
    nodes: tuple[Placed, ...]
    unused: tuple[Node, ...] = ()


@dataclass
class ClusterLayout:
    """Stable pool ids for a changing set of nodes (see the module docstring)."""

    placed: dict[str, Placed] = field(default_factory=dict)  # alive nodes by node id
    unused: tuple[Node, ...] = ()
    _next: int = 0
    _pool: DevicePool | None = None

    def update(self, nodes: Iterable[Node], cfg: Config) -> NodeChange:
        """Take the nodes alive now; new ones get ids in order of address, then of their own
        devices (nodes sharing a machine: their cores in order), then of node id."""
        alive = {n.node_id: n for n in nodes if n.devices}
        left = tuple(p for nid, p in self.placed.items() if nid not in alive)
        for p in left:
            del self.placed[p.node.node_id]
        kind = _pool_kind([*alive.values()])
        joined = []
        for nid in sorted(alive, key=lambda i: (alive[i].address, alive[i].devices, i)):
            n = alive[nid]
            if nid in self.placed or n.kind != kind:
                continue
            ids = tuple(range(self._next, self._next + len(n.devices)))
            self._next += len(ids)
            self.placed[nid] = p = Placed(n, ids)
            joined.append(p)
        self.unused = tuple(n for nid, n in sorted(alive.items()) if n.kind != kind)
        self._pool = _cluster_pool(cfg, kind, list(self.placed.values()))
        return NodeChange(self._pool, tuple(joined), left, tuple(self.placed.values()),
                          self.unused)

    def pool(self, cfg: Config) -> DevicePool:
        if self._pool is None:
            self._pool = _cluster_pool(cfg, "cpu", [])
        return self._pool

    def locate(self, ids: Iterable[int]) -> Placed | None:
        """The node holding every one of pool ids `ids`, or None (a node gone, or ids of two)."""
        want = set(ids)
        for p in self.placed.values():
            if want <= set(p.ids):
                return p
        return None


def _pool_kind(nodes: list[Node]) -> str:
    """The device kind with the most devices (ties: "cpu" last, then by name)."""
    count: dict[str, int] = {}
    for n in nodes:
        count[n.kind] = count.get(n.kind, 0) + len(n.devices)
    if not count:
        return "cpu"
    return max(sorted(count), key=lambda k: (count[k], k != "cpu"))


def _cluster_pool(cfg: Config, kind: str, placed: list[Placed]) -> DevicePool:
    ids = tuple(sorted(i for p in placed for i in p.ids))
    groups = tuple(p.ids for p in sorted(placed, key=lambda p: p.ids))
    d = cfg.devices
    if kind == "cpu":
        memory = int((d.memory_gib or d.cpu_kvcache_gib) * GiB)
        biggest = max((len(g) for g in groups), default=1)
        return DevicePool("cpu", ids, memory, groups, start_contention(cfg, "cpu"),
                          max_threads(cfg, biggest))
    memory = int((d.memory_gib or GPU_MEMORY_GIB.get(kind, 80)) * GiB)
    return DevicePool(kind, ids, memory, groups, start_contention(cfg, kind))


def planning_pool(spec: str, cfg: Config, gpu: str = "a100") -> DevicePool:
    """The pool `samullm plan` plans on. `auto`: what `serve` discovers on this machine
    (`discover_pool`, so plan and serve plan alike), else, where this machine cannot serve the
    config (a cuda config without GPUs, cores it does not have), the pool the config describes,
    with `gpu`'s memory for a cuda config that sets none. `cpu:N`, `a100xN[-nvlink-pairs]` and
    `h100xN`: hypothetical pools; `NxKINDxM` (`4xa100x8`, `2xcpux16`): a cluster of N nodes of M
    devices each, laid out as `serve` lays out a Ray cluster's (`ClusterLayout`)."""
    if spec == "auto":
        try:
            return discover_pool(cfg)
        except ConfigError:
            return _described_pool(cfg, gpu)
    m = _NODES.match(spec)
    if m:
        n, kind, per = int(m.group(1)), m.group(2), int(m.group(3))
        nodes = [Node(f"node-{i}", f"node-{i}", kind, tuple(range(per))) for i in range(n)]
        return ClusterLayout().update(nodes, cfg).pool
    m = _PRESET.match(spec)
    if m:
        kind, n = m.group(1), int(m.group(2))
        ids = tuple(range(n))
        groups = tuple(ids[i:i + 2] for i in range(0, n, 2)) if m.group(3) else ()
        return DevicePool(kind, ids, GPU_MEMORY_GIB[kind] * GiB, groups, start_contention(cfg, kind))
    if spec.startswith("cpu:"):
        try:
            n = int(spec[4:])
        except ValueError:
            raise ConfigError(f"--devices {spec}: expected cpu:N") from None
        return DevicePool("cpu", tuple(range(n)), int(cfg.devices.cpu_kvcache_gib * GiB), (),
                          start_contention(cfg, "cpu"), max_threads(cfg, n))
    raise ConfigError(f"--devices {spec}: one of auto, cpu:N, a100xN[-nvlink-pairs], h100xN, "
                      "NxKINDxM (N nodes of M a100, h100 or cpu devices)")


def _described_pool(cfg: Config, gpu: str) -> DevicePool:
    d = cfg.devices
    groups = tuple(tuple(g) for g in d.topology_groups)
    if d.kind == "cuda":
        ids = tuple(d.ids) or tuple(sorted(i for g in groups for i in g))
        if not ids:
            raise ConfigError("devices.ids: a cuda config needs ids (or topology_groups) to plan")
        return DevicePool(gpu, ids, int((d.memory_gib or GPU_MEMORY_GIB[gpu]) * GiB), groups,
                          start_contention(cfg, gpu))
    ids = tuple(d.ids) or tuple(sorted(os.sched_getaffinity(0)))
    return DevicePool("cpu", ids, int((d.memory_gib or d.cpu_kvcache_gib) * GiB), groups,
                      start_contention(cfg, "cpu"), max_threads(cfg, len(ids)))


def _restrict(found: list[int], wanted: list[int], what: str) -> list[int]:
    if not wanted:
        return found
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise ConfigError(f"devices.ids: {missing} not among the {what} {found}")
    return sorted(wanted)


def _groups(groups: list[list[int]], ids: list[int]) -> tuple[tuple[int, ...], ...]:
    """Configured groups limited to the usable ids (empty groups dropped)."""
    out = tuple(tuple(sorted(set(g) & set(ids))) for g in groups)
    return tuple(g for g in out if g)


def _gpu_pool(cfg: Config, gpus: list[dict]) -> DevicePool:
    d = cfg.devices
    ids = _restrict([g["index"] for g in gpus], d.ids, "GPUs found")
    chosen = [g for g in gpus if g["index"] in ids]
    memory = int(d.memory_gib * GiB) if d.memory_gib else min(g["memory"] for g in chosen)
    groups = (_groups(d.topology_groups, ids) if d.topology_groups
              else _cliques(ids, {g["index"]: g["nvlink"] for g in chosen}))
    kind = _gpu_kind(chosen[0]["name"])
    return DevicePool(kind, tuple(ids), memory, groups, start_contention(cfg, kind))


def _gpu_kind(name: str) -> str:
    """A short GPU kind ("a100", "h100", ...) for latency-profile keys; "cuda" when unknown."""
    low = name.lower()
    for kind in ("a100", "h100", "h200", "l40", "a10", "v100"):
        if kind in low:
            return kind
    return "cuda"


def _cliques(ids: list[int], links: dict[int, set[int]]) -> tuple[tuple[int, ...], ...]:
    """Split GPUs into fully NVLink-connected groups, greedily by id; all connected -> one group."""
    if all(set(ids) - {i} <= links.get(i, set()) for i in ids):
        return (tuple(ids),)
    left, groups = list(ids), []
    while left:
        group = [left.pop(0)]
        for j in list(left):
            if all(j in links.get(i, set()) for i in group):
                group.append(j)
                left.remove(j)
        groups.append(tuple(group))
    return tuple(groups)


def _nvml_gpus() -> list[dict] | None:
    """[{index, name, memory, nvlink: set of peer indices}] or None without NVML / GPUs."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        gpus = []
        for i, h in enumerate(handles):
            name = pynvml.nvmlDeviceGetName(h)
            peers = set()
            for j, h2 in enumerate(handles):
                if i == j:
                    continue
                try:
                    status = pynvml.nvmlDeviceGetP2PStatus(h, h2, pynvml.NVML_P2P_CAPS_INDEX_NVLINK)
                except pynvml.NVMLError:
                    continue
                if status == pynvml.NVML_P2P_STATUS_OK:
                    peers.add(j)
            gpus.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                         "memory": int(pynvml.nvmlDeviceGetMemoryInfo(h).total), "nvlink": peers})
        return gpus or None
    finally:
        pynvml.nvmlShutdown()
