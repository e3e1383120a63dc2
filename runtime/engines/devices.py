"""Device discovery: which CPU cores or GPUs a plan may use, their memory and their topology.

CPU: a device is a core this process may run on (`os.sched_getaffinity`); its "memory" is the KV cache
space one engine gets (`[devices].cpu_kvcache_gib`). CUDA: GPUs seen by NVML (pynvml, the `gpu` extra),
their memory, and NVLink-connected groups (a TP group never spans two groups). `[devices]` overrides what
is detected: `ids` restricts, `topology_groups` replaces the detected groups, `memory_gib` the memory.
"""

from __future__ import annotations

import os
import re

from runtime.config import Config, ConfigError
from scheduler.types import DevicePool, default_start_contention

GiB = 1 << 30
GPU_MEMORY_GIB = {"a100": 80, "h100": 80}  # `samullm plan`'s GPU presets (no NVML to ask)
_PRESET = re.compile(r"^(a100|h100)x(\d+)(-nvlink-pairs)?$")


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


def discover_pool(cfg: Config) -> DevicePool:
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


def planning_pool(spec: str, cfg: Config, gpu: str = "a100") -> DevicePool:
    """The pool `samullm plan` plans on. `auto`: what `serve` discovers on this machine
    (`discover_pool`, so plan and serve plan alike), else, where this machine cannot serve the
    config (a cuda config without GPUs, cores it does not have), the pool the config describes,
    with `gpu`'s memory for a cuda config that sets none. `cpu:N`, `a100xN[-nvlink-pairs]` and
    `h100xN`: hypothetical pools."""
    if spec == "auto":
        try:
            return discover_pool(cfg)
        except ConfigError:
            return _described_pool(cfg, gpu)
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
    raise ConfigError(f"--devices {spec}: one of auto, cpu:N, a100xN[-nvlink-pairs], h100xN")


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
