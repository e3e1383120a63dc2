"""Spare engine processes as the plan sees them (`runtime.engines.spares` keeps them on CPU pools).

A spare is an interpreter that has imported vLLM's API server already: an engine started in one
skips that import, one started without pays `import_s` more (the CPU seconds the import takes).
Each engine a stage starts takes a ready spare, in the stage's plan order (the order the runtime
starts them). The runtime replaces a spare once the engine that took it is up, and the replacement
imports at nice 19: on a core that an engine keeps busy it gets almost nothing, so here it makes
progress only on the stage's idle cores, which the spares importing at the time share.

Measured on the makespan bench (1 Dec): `sequential` leaves a core idle while a one-core engine
starts, and its fourth start found a refilled spare; `even-split` keeps both cores busy, and its
fourth start found none. A model that never refills missed the first by 21 %.

Since 5 Dec the runtime forks its spares from one zygote that imported once: a replacement is
ready at once, so once the zygote is ready the runtime reports no pool (None: every start priced as
one in a spare), and these slots model only a gateway whose zygote still imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

EPS = 1e-9


@dataclass(frozen=True)
class SpareSlot:
    """One spare of the pool: ready when nothing is left of either."""

    wait_s: float = 0.0  # until its import begins (the engine whose spare it replaces is starting)
    import_s: float = 0.0  # CPU seconds of import left

    @property
    def ready(self) -> bool:
        return self.wait_s <= EPS and self.import_s <= EPS


def slots_of(import_left: Sequence[float] | None) -> tuple[SpareSlot, ...] | None:
    """The pool's spares from the CPU seconds of import each has left (0: ready)."""
    if import_left is None:
        return None
    return tuple(SpareSlot(0.0, max(0.0, float(x))) for x in import_left)


def refilled(slots: tuple[SpareSlot, ...] | None) -> tuple[SpareSlot, ...] | None:
    """The pool's spares after a pause in which every one finished importing (`level-by-level`
    assumes it between levels: the next level is a new batch, sent after the last one ended)."""
    return None if slots is None else tuple(SpareSlot() for _ in slots)


def ready_count(slots: Sequence[SpareSlot] | None) -> int | None:
    return None if slots is None else sum(s.ready for s in slots)


def take(slots: tuple[SpareSlot, ...], engines: int, up_s: float,
         import_s: float) -> tuple[SpareSlot, ...]:
    """`engines` engines that will be up in `up_s` each take a ready spare (while there are any);
    the replacements begin their `import_s` of import once the engines are up."""
    out, taken = list(slots), 0
    for i, s in enumerate(out):
        if taken == engines:
            break
        if s.ready:
            out[i] = SpareSlot(up_s, import_s)
            taken += 1
    return tuple(out)


def advance(slots: tuple[SpareSlot, ...], dur: float, idle_cores: int) -> tuple[SpareSlot, ...]:
    """The slots after `dur` seconds in which `idle_cores` cores are free: every spare importing
    gets an equal share of them (at most one core each), from the moment its wait is over."""
    wait = [s.wait_s for s in slots]
    left = [s.import_s for s in slots]
    t = 0.0
    while t < dur - EPS:
        active = [i for i in range(len(slots)) if wait[i] <= t + EPS and left[i] > EPS]
        pending = [wait[i] for i in range(len(slots)) if wait[i] > t + EPS and left[i] > EPS]
        nxt = min(pending, default=dur)
        rate = min(1.0, idle_cores / len(active)) if active and idle_cores > 0 else 0.0
        if rate > 0:
            nxt = min(nxt, t + min(left[i] for i in active) / rate)
        nxt = min(nxt, dur)
        for i in active:
            left[i] = max(0.0, left[i] - rate * (nxt - t))
            if left[i] <= EPS:
                left[i] = 0.0
        if rate == 0 and not pending:
            break  # nothing moves for the rest of the stage
        t = nxt
    return tuple(SpareSlot(max(0.0, w - dur), l) for w, l in zip(wait, left))
