"""Guests: a CPU engine asleep (frozen, `runtime.executor.slots`) woken to serve small batches of its
model beside the stage's engines, on cores they use, out of the plan.

A small batch (one with fewer than about twice the seats left in all, its `priority` on the model
at most the seats', `seats`), arriving while no engine of its model is in the plan, wakes that
model's sleeping engine as a guest (`visit`): on its own cores or, for a one-core engine, on the
core where no small batch is served and the plan's engines have the most time to spare (`cores`),
beside the engine there. It takes small batches' requests only (`queues.pop(at_most)`), which are
left out of the plan while it serves them (`takes`), and goes back home to sleep when they are
done; a stage that wants it where it sleeps makes it a member of the plan
(`slots.EngineSlots._wake`).

Why: with both cores serving a big batch, a 20-request batch whose model's engine had stopped
waited for a stage change (19-22 s against a 4.3 s target in `bench/fairness.py`, 5 Dec 2026),
while taking a core from the big batch costs it a stop, a start and a restart. A guest costs the
big batch only the small batch's own work (the same run with guests: 0.5-0.6 s inside the gateway).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from runtime.executor import dispatch
from runtime.executor.dispatch import Slot, SlotState

if TYPE_CHECKING:
    from runtime.executor.slots import EngineSlots


class Guests:
    """The guest visits of `slots`' sleeping engines (composed into `EngineSlots`)."""

    def __init__(self, slots: "EngineSlots") -> None:
        self.slots = slots
        # the models of the stage being carried out (set as `EngineSlots.apply` begins): never a
        # guest's (`visit`)
        self.planned: set[str] = set()

    def visit(self, model: str) -> None:
        """A request of `model` was queued: when no engine of `model` is in the plan or a guest
        already, and one sleeps frozen, wake it as a guest if a small batch of `model` has
        requests queued."""
        queues = self.slots.owner.queues
        if not queues.fair or any(s.model == model and (s.state.active or s.state is SlotState.GUEST)
                                  for s in self.slots.all):
            return
        if model in self.planned:
            # the stage being applied runs `model` on an engine it has yet to start or wake: the
            # one it put to sleep for that, woken as a guest on the cores the new one starts on,
            # served the same batch's last 63 requests beside it (`bench/fresh.py`, 6 Dec 2026:
            # 21.5 s for them, the batch 34.3 s against 21 s)
            return
        slot = next((s for s in self.slots.all if s.model == model and s.state is SlotState.SLEEPING
                     and s.spec.device_kind == "cpu"), None)
        # only one frozen already: a slot being put to sleep is SLEEPING while it awaits its
        # memory reading, and woken then as a guest it was frozen under its guest's request
        # (the makespan bench's even-split batch hung on it, 5 Dec 13:27)
        if slot is None or slot.engine is None or not slot.engine.frozen:
            return
        small = slot.inflight.small()
        if not any(p <= small and self.small(b, small)
                   for b, p in queues.priorities(model).items()):
            return
        if not slot.engine.thaw():  # it died asleep: reap it (a plan starts another when needed)
            slot.move(SlotState.STOPPING)
            self.slots.reap(slot.engine)
            slot.move(SlotState.STOPPED)
            self.slots.all.remove(slot)
            return
        slot.guest_cores = self.cores(slot)
        if slot.guest_cores != tuple(slot.spec.devices):
            slot.engine.pin(slot.guest_cores)
        slot.move(SlotState.GUEST)
        self.slots.owner.emit("engine_guest", **slot.describe(), cores=list(slot.guest_cores))
        slot.task = asyncio.create_task(self._serve_guest(slot), name=f"guest-{slot.sid}-{model}")

    def small(self, batch: str, small: int) -> bool:
        """Whether `batch` is small as a whole. A pooled batch's share of a model is the plan's to
        serve: a guest serving it beside the plan made the fresh bench's batches 40 % faster than
        planned."""
        return self.slots.owner.batch_open(batch).bit_length() <= small

    def takes(self, model: str, batch: str) -> bool:
        """Whether a guest of `model` is awake and serves `batch`'s requests: those are out of the
        plan, as the guest is. Why: planned, they made a stage that put the big batch's running
        engine to sleep for them (its 48 requests in flight aborted, their progress lost: the
        fairness bench's big batch 1.14× its alone time, 5 Dec 2026 15:50) while the guest
        beside it served them already."""
        return any(s.model == model and s.state is SlotState.GUEST
                   and self.small(batch, s.inflight.small()) for s in self.slots.all)

    def cores(self, slot: Slot) -> tuple[int, ...]:
        """Where a guest serves: a one-core engine on the core with the fewest engines serving
        small batches now (guests, and engines holding for small batches, `seats`), then whose
        engines' models the plan predicted to finish soonest (an idle one: now), its own core
        first among equals. Why: a guest's work delays whatever shares its core, so it goes
        where a small batch is not already served and where the big batch has the most slack
        (the fairness bench on 5 Dec: two small batches together on tiny-a's core took 0.60 s
        against 0.12 s alone; guests on tiny-a's core, whose share of the big batch ended last,
        made the big batch 1.07× its alone time while medium's core had 1.8 s to spare). A
        wider engine stays on its own cores (its ranks' OpenMP threads are bound to them)."""
        home = tuple(slot.spec.devices)
        if len(home) != 1 or self.slots.pool is None:
            return home
        now = self.slots.owner.clock.monotonic()
        load = {d: [0, now, d != home[0]] for d in self.slots.pool.ids}
        for s in self.slots.all:
            if s is slot:
                continue
            if s.state is SlotState.GUEST:
                cores, small = s.guest_cores, 1
            elif s.state.active:
                cores, small = tuple(s.spec.devices), int(s.inflight.held_since is not None)
            else:
                continue
            ends = self.slots.finish_at.get(s.model, now) if s.idle_since is None else now
            for d in cores:
                if d in load:
                    load[d][0] += small
                    load[d][1] = max(load[d][1], ends)
        return (min(load, key=lambda d: load[d]),) if load else home

    def home(self, slot: Slot) -> None:
        """A guest back on its own cores (to sleep, or to serve in the plan)."""
        if slot.engine is not None and slot.guest_cores not in ((), tuple(slot.spec.devices)):
            slot.engine.pin(tuple(slot.spec.devices))
        slot.guest_cores = ()

    async def _serve_guest(self, slot: Slot) -> None:
        await dispatch.serve_slot(slot, self.slots.owner)
        if slot.state is not SlotState.GUEST:
            return  # it joined the plan (and still serves: this task is its dispatch loop), or died
        assert slot.engine is not None
        self.home(slot)
        slot.move(SlotState.SLEEPING)
        slot.task = None  # this one ends here: a stop must not wait for it
        if await dispatch.sleep_engine(slot.engine):
            self.slots.owner.emit("engine_sleep", **slot.describe(), requeued=0, after="guest",
                                  memory_gib=round(slot.sleep_bytes / 2**30, 2))
        else:
            await self.slots.stop(slot, "sleep failed")

