"""Which engines a stage stops or puts to sleep, and what that costs the stage's starts.

Stops: the runtime stops the engines a stage replaces (running ones it does not keep, idle ones on
devices it needs) and waits until they are gone before it starts any (`runtime.executor.slots`), so
each engine a stage (re)starts while something stops pays `Context.stop_s` more. An engine whose
model finished stays up idle (`PlanState.idle`: the runtime keeps it warm) until a start needs its
devices. Where engines sleep (CPU: frozen at once, `PlanState.sleep_room`), an engine replaced
sleeps instead while the room allows (`put_to_sleep`): nothing waits for it, and a later stage of
its plan wakes it (`PlanState.asleep`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from scheduler.types import ExecPlan

if TYPE_CHECKING:
    from scheduler.stages import Context, PlanState

# what waking an engine asleep costs before it serves (a CPU engine thawed: its next request was
# answered in 0.08 s, as before it slept, `runtime.engines.engine`)
WAKE_S = 0.05


def stopped_by(state: PlanState, plans: Sequence[ExecPlan], kept: dict[str, bool]) -> list[ExecPlan]:
    """The engines up at `state` that a stage of `plans` stops (as `runtime.executor.slots` does):
    running ones it does not keep (`kept`: the model's running engines all stay, the plan the
    same, fewer replicas of it, or more: `scheduler.growth`), and idle ones on devices an engine
    it starts needs."""
    keep = {p.model for p in plans if kept[p.model]}
    needed = {d for p in plans if not p.within(state.running.get(p.model)) for d in p.devices}
    return [e for m, e in state.running.items() if m not in keep] + [
        e for e in state.idle.values() if needed & set(e.devices)]


def put_to_sleep(ctx: Context, state: PlanState, stopped: Sequence[ExecPlan]
                 ) -> tuple[list[ExecPlan], float | None]:
    """Of the engines `stopped` by a stage, those the runtime puts to sleep instead (CPU engines
    frozen while the sleep budget allows, `runtime.executor.slots`), in order, and the room left
    after them (None: engines are stopped, not put to sleep)."""
    room = state.sleep_room
    if room is None:
        return [], None
    slept = []
    for e in stopped:
        if ctx.sleep_bytes(e) <= room:
            slept.append(e)
            room -= ctx.sleep_bytes(e)
    return slept, room
