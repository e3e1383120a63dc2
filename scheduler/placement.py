"""Device placement of plan shapes, and the memory rules that make a (model, TP) plan feasible.

A shape is (model, tp, dp). Placement turns shapes into `ExecPlan`s with concrete device ids such that
plans never share a device and every TP group lies inside one topology group (NVLink island; on CPU the
whole pool is one group). Engines that keep their shape keep their devices when possible, so they
need no restart.
"""

from __future__ import annotations

from typing import Sequence

from scheduler.types import DevicePool, ExecPlan, ModelSpec

# (model, tp, dp), or (model, tp, dp, threads) for CPU ranks on several cores each (threads > 1);
# threads = 1 shapes stay 3-tuples, so plans without threads look exactly as before
Shape = tuple


def unpack(shape: Shape) -> tuple[str, int, int, int]:
    """(model, tp, dp, threads) of a 3- or 4-tuple shape."""
    return (shape[0], shape[1], shape[2], shape[3] if len(shape) > 3 else 1)


def make_shape(model: str, tp: int, dp: int, threads: int = 1) -> Shape:
    return (model, tp, dp) if threads == 1 else (model, tp, dp, threads)


def shape_devices(shape: Shape) -> int:
    """Devices a shape occupies: tp × threads × dp."""
    _, tp, dp, th = unpack(shape)
    return tp * th * dp

GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default fraction of a GPU an engine may use
# Per-rank memory besides weights and KV: activations of a max_num_batched_tokens forward pass,
# CUDA context, NCCL buffers, CUDA graphs. vLLM measures it in a profile run; ~2 GiB on an A100 for
# 7B-70B models at 8k batched tokens is what its start-up logs show, so we reserve that.
GPU_RESERVED_BYTES = 2 * 1024**3


def gpu_kv_bytes_per_rank(spec: ModelSpec, tp: int, memory_bytes: int,
                          utilization: float = GPU_MEMORY_UTILIZATION) -> int:
    """KV space one rank of a TP-`tp` engine gets on a GPU of `memory_bytes` (≤ 0: weights don't fit)."""
    return int(memory_bytes * utilization - spec.weight_bytes / tp - GPU_RESERVED_BYTES)


def tp_degrees(pool: DevicePool) -> list[int]:
    """Powers of two up to the largest topology group (a TP group never spans two groups)."""
    biggest = max(len(g) for g in pool.topology_groups())
    out, tp = [], 1
    while tp <= biggest:
        out.append(tp)
        tp *= 2
    return out


def max_replicas(pool: DevicePool, tp: int) -> int:
    """How many disjoint groups of `tp` devices (a replica's tp × threads) the pool holds."""
    return sum(len(g) // tp for g in pool.topology_groups())


def thread_counts(pool: DevicePool) -> list[int]:
    """Cores per rank a plan may use: powers of two up to `pool.max_threads` (CPU pools only)."""
    if pool.kind != "cpu":
        return [1]
    biggest = max(len(g) for g in pool.topology_groups())
    out, th = [1], 2
    while th <= min(pool.max_threads, biggest):
        out.append(th)
        th *= 2
    return out


def place(shapes: Sequence[Shape], pool: DevicePool,
          running: dict[str, ExecPlan] | None = None) -> list[ExecPlan] | None:
    """Concrete devices for `shapes`, or None when they do not fit the topology.

    Shapes equal to a running plan's (tp, dp), or with fewer replicas, first try to keep that plan's
    devices (the first replicas'); if that makes the
    rest unplaceable, everything is placed afresh (the moved engines then restart). Replicas are
    placed largest TP first into the topology group with the fewest free devices that still fits
    (best fit), which is optimal for power-of-two TP sizes in equal power-of-two groups.
    """
    running = running or {}
    kept: dict[str, tuple[int, ...]] = {}
    taken: set[int] = set()
    for shape in shapes:
        m, tp, dp, th = unpack(shape)
        cur = running.get(m)
        # the same shape, or fewer replicas of it: on (the first of) its replicas' devices
        devs = cur.devices[:cur.width * dp] if cur is not None and cur.fits_in(tp, dp, th) else ()
        if devs and not taken & set(devs) and set(devs) <= set(pool.ids):
            kept[m] = devs
            taken |= set(devs)
    placed = _pack(shapes, pool, kept)
    if placed is None and kept:
        placed = _pack(shapes, pool, {})
    return placed


def _pack(shapes: Sequence[Shape], pool: DevicePool,
          kept: dict[str, tuple[int, ...]]) -> list[ExecPlan] | None:
    used = {d for devs in kept.values() for d in devs}
    free = [[d for d in g if d not in used] for g in pool.topology_groups()]
    parts = [unpack(s) for s in shapes]
    # a replica needs tp × threads devices of one group (its ranks on consecutive cores)
    replicas = [(tp * th, i, r) for i, (m, tp, dp, th) in enumerate(parts) if m not in kept
                for r in range(dp)]
    replicas.sort(key=lambda x: (-x[0], x[1], x[2]))
    got: dict[int, list[tuple[int, ...]]] = {}
    for width, i, _r in replicas:
        fits = [g for g in range(len(free)) if len(free[g]) >= width]
        if not fits:
            return None
        g = min(fits, key=lambda j: (len(free[j]), j))
        got.setdefault(i, []).append(tuple(free[g][:width]))
        free[g] = free[g][width:]
    plans = []
    for i, (m, tp, dp, th) in enumerate(parts):
        devices = kept[m] if m in kept else tuple(d for rep in got[i] for d in rep)
        plans.append(ExecPlan(m, tp, dp, devices, th))
    return plans
