"""The executor's engine replicas ("slots"): apply a plan's stage, start, stop, sleep, wake.

Sleep on CPU: an engine whose cores a new stage takes is frozen (`Engine.freeze`) instead of stopped
while the memory sleeping engines hold stays within `[devices] cpu_sleep_gib`: a CPU start costs
3.5-4 s of a core (a forked one, 16 s spawned), a freeze and a wake nothing. A later stage that
wants it back (same model, TP and cores) wakes it instead of starting one, and a small batch of
its model can wake it as a guest beside the stage's engines (`runtime.executor.guests`). A
sleeping engine whose model has had no work for `engine_linger_s` is stopped.

`EngineSlots` is a part of the executor (composed, not mixed in): it owns the list of slots and
every engine start, stop, sleep and wake; what it needs of the executor is `SlotOwner` (re-queue a
request, record an event, hear of a failed start), which is also the slots' `dispatch.SlotHost`.
Every state change of a slot goes through `Slot.move` (guarded, `dispatch.SLOT_MOVES`).

No orphans: an engine is stopped by exactly one task (`_reap`) that nothing cancels, and whoever
waits for a stop or a slot task waits with `settle` (never `gather`, whose cancellation would cancel
what it waits for: a stop cut short leaves the engine's process group running).
"""

from __future__ import annotations

import asyncio
import itertools
import math
from pathlib import Path
from typing import Any, Protocol

from runtime.executor import dispatch
from runtime.clock import Clock
from runtime.config import Config
from runtime.engines.devices import engine_device_kind
from runtime.executor.dispatch import Slot, SlotHost, SlotState
from runtime.executor.guests import Guests
from runtime.engines.engine import EngineSpec
from runtime.executor.pool_state import Req
from runtime.executor.planning import ReplicaKey, sleep_budget, stage_replicas
from scheduler.types import DevicePool, Stage

INFLIGHT_FACTOR = 1.5  # requests kept in flight per engine, relative to its max_num_seqs


async def settle(*tasks: asyncio.Task | None) -> None:
    """Wait for `tasks` to end. Unlike gather, being cancelled does not cancel them: an engine stop
    or a sink call must never be cut short by whoever was waiting for it."""
    pending = [t for t in tasks if t is not None and not t.done()]
    if pending:
        await asyncio.wait(pending)


async def stop_task(task: asyncio.Task | None) -> None:
    """Cancel `task` once (a second cancel would interrupt the clean-up of the first, e.g. a
    cancelled engine start stopping its half-started process) and wait for it to end."""
    if task is None:
        return
    if not task.done() and not task.cancelling():
        task.cancel()
    await settle(task)


class SlotOwner(SlotHost, Protocol):
    """What `EngineSlots` needs of the executor besides what a slot's dispatch loop needs."""

    def push(self, req: Req, front: bool = False) -> None: ...
    def emit(self, kind: str, **data: Any) -> None: ...
    def batch_open(self, batch_id: str) -> int: ...  # its requests without an outcome yet
    # in-flight requests of `slot` were aborted (the online calibration is told)
    def requests_aborted(self, slot: Slot, reqs: list[Req]) -> None: ...
    def engine_stopped(self, seconds: float) -> None: ...  # an engine's stop took `seconds`
    clock: Clock


class EngineSlots:
    """The executor's engine replicas: `all` (starting, running or sleeping) and the stops still
    in progress (`dying`: their devices are not free yet)."""

    def __init__(self, cfg: Config, owner: SlotOwner, state_dir: Path) -> None:
        self.cfg, self.owner, self.state_dir = cfg, owner, state_dir
        self.pool: DevicePool | None = None  # set by the executor's start()
        self.all: list[Slot] = []
        self._sid = itertools.count(1)
        self.dying: set[asyncio.Task] = set()
        self._reaping: dict[int, asyncio.Task] = {}  # id(engine) -> its stop task
        # what sleeping CPU engines may hold in all (see the module docstring)
        self.sleep_budget = sleep_budget(cfg)
        self.slept_bytes: dict[str, int] = {}  # model -> what its engine last held asleep
        self.guests = Guests(self)
        # model -> when the stage applied last predicted it done (executor clock; `Guests.cores`)
        self.finish_at: dict[str, float] = {}

    def __iter__(self):
        return iter(list(self.all))

    def starting(self, now: float) -> dict[str, tuple[float, int, bool]]:
        """Engines not serving yet: model -> (seconds since their start began, most engines seen
        starting with them, whether it started in a spare process), for the planner
        (`planning.plan_problem`)."""
        launcher = self.owner.launcher
        return {s.model: (now - s.launched_at, s.starting_with, launcher.in_spare(s.spec))
                for s in self.all if s.state is SlotState.STARTING}

    def active_keys(self) -> list[ReplicaKey]:
        return [s.key for s in self.all if s.state.active]

    def any_active(self) -> bool:
        return any(s.state.active for s in self.all)

    def inflight_cap(self, slot: Slot, queued: int) -> int:
        """How many requests `slot` may hold in flight, `queued` being its model's queue: its
        `limit`, but no more than an even share of its model's work (queued and in flight) among
        the replicas in the plan, starting ones included. Why: each takes up to 1.5 × its seats
        at once, so the first of two replicas up took a whole 64-request queue and the other none
        (medium as TP 1 × DP 2 in `bench/fresh.py`: 12.4 s served against 9.2 s planned, 5 Dec
        2026); the planner splits a model's requests evenly among its replicas
        (`scheduler.dag.split_replicas`). A guest is alone with its small batches."""
        if slot.state is SlotState.GUEST:
            return slot.limit
        peers = [s for s in self.all if s.model == slot.model and s.state.active]
        if len(peers) <= 1:
            return slot.limit
        work = queued + sum(len(s.inflight) for s in peers)
        return max(1, min(slot.limit, math.ceil(work / len(peers))))

    def serves_small(self, model: str, batch: str) -> bool:
        """Whether an engine of `model` is up and serving (in the plan, or a guest) and `batch`
        is small on its seats as a whole (`Guests.small`): served at once, by the hold."""
        return any(s.model == model and s.state.serving and s.engine is not None
                   and self.guests.small(batch, s.inflight.small()) for s in self.all)

    def rebalance(self, slot: Slot, queued: int) -> None:
        """A replica just up or woken (`slot`) takes over what its model's other replicas hold
        past their engines' seats and past an even share (`inflight_cap`, `queued` being the
        model's queue): requests their engines have not begun (vLLM runs at most its seats at
        once; the newest sent wait in its queue), aborted and put back at the queue's head, where
        `slot` takes them first. Why: a plan grown by a replica keeps the running one
        (`scheduler.growth`), which held 1.5 × its seats; the new one got only the queue's rest
        (`bench.fresh`, 5 Dec 2026: 15 of medium's 63 requests, the planner splitting them even)."""
        if slot.state is not SlotState.RUNNING:
            return
        for peer in self.all:
            if peer is slot or peer.model != slot.model or peer.state is not SlotState.RUNNING:
                continue
            held = len(peer.inflight)
            n = min(held - self.inflight_cap(peer, queued), held - peer.inflight.seats)
            if n <= 0:
                continue
            moved = list(peer.inflight)[-n:]
            for req in moved:
                peer.inflight.pop(req).cancel()
            self.requeue(peer, moved)
            queued += n
            self.owner.emit("requests_moved", **peer.describe(), requests=n,
                            to=list(slot.spec.devices))

    def wake(self, model: str | None = None) -> None:
        """Wake the dispatch loops (of `model`'s slots only, when given)."""
        for s in self.all:
            if model is None or s.model == model:
                s.wake.set()

    def fail(self, slot: Slot) -> list[Req]:
        """Mark `slot` failed (its start failed or its engine died) and forget it; returns its
        in-flight requests, now owned by the caller."""
        slot.move(SlotState.FAILED)
        self.all.remove(slot)
        return self.take_inflight(slot)

    def take_inflight(self, slot: Slot) -> list[Req]:
        """Pop (own) and abort every in-flight request of `slot`, in dispatch order."""
        reqs = list(slot.inflight)
        for task in slot.inflight.values():
            task.cancel()
        slot.inflight.clear()
        return reqs

    def _preempt(self, slot: Slot) -> list[Req]:
        """Abort the slot's in-flight requests and put them back at the head of their queue."""
        reqs = self.take_inflight(slot)
        self.requeue(slot, reqs)
        return reqs

    def requeue(self, slot: Slot, reqs: list[Req]) -> None:
        """Put `reqs`, aborted in flight on `slot` (in dispatch order), back at the head of their
        queue, in order, and tell the online calibration (`requests_aborted`). A preemption is
        not a failure: no retry is consumed (the attempt is counted)."""
        for req in reversed(reqs):
            req.requeue()
            self.owner.push(req, front=True)
        self.owner.requests_aborted(slot, reqs)

    def reap(self, engine: Any) -> asyncio.Task:
        """Stop `engine` in a task of its own that nothing cancels: a stop cut short by a cancel
        (close() interrupting a pass) would leave its process group running. One task per engine."""
        task = self._reaping.get(id(engine))
        if task is None:
            task = asyncio.create_task(engine.stop(), name=f"stop-{getattr(engine, 'pid', '?')}")
            self._reaping[id(engine)] = task
            self.dying.add(task)

            def done(t: asyncio.Task, key: int = id(engine)) -> None:
                self.dying.discard(t)
                self._reaping.pop(key, None)
            task.add_done_callback(done)
        return task

    async def apply(self, stage: Stage | None, has_work: set[str], now: float = 0.0) -> None:
        """Make the engines match `stage`: keep replicas whose (model, tp, devices) it still wants,
        stop (or put to sleep) the others, wait until their devices are free, start the new ones
        (concurrently: each launch runs in its slot's task). `has_work`: models with requests left.
        An engine whose model has no work left is kept warm (idle) while its devices are not needed
        and it has been idle less than `[devices] engine_linger_s` (on the executor's clock `now`):
        the next batch of its model then starts nothing."""
        desired = stage_replicas(stage) if stage is not None else {}
        self.guests.planned = {k[0] for k in desired}
        self.finish_at = {m: now + t for m, t in stage.predicted_finish_s.items()} if stage else {}
        keep = {s.key: s for s in self.all if s.state.active and s.key in desired}
        for s in self.all:
            if s.model in has_work:
                s.idle_since = None
        asleep = (SlotState.SLEEPING, SlotState.GUEST)
        wake = {s.key: s for s in self.all
                if s.state in asleep and s.key in desired and s.key not in keep}
        new = [k for k in desired if k not in keep and k not in wake]
        needed = {d for k in [*new, *wake] for d in k[2]}  # a woken engine needs its devices too
        stops, sleeps = [], []
        for s in self.all:
            if s.key in keep or s.key in wake or s.state is SlotState.GUEST:
                continue  # a guest sleeps again by itself once its small batches are done
            if s.state is SlotState.RUNNING and self._may_linger(s, needed, has_work, now):
                s.idle_since = now if s.idle_since is None else s.idle_since
            elif s.state.active and self._may_sleep(s, needed, has_work, now):
                sleeps.append(s)
            elif s.state.active or s.state is SlotState.SLEEPING and self._sleep_ends(
                    s, needed, has_work, now):
                stops.append(s)
        await asyncio.gather(*(self.stop(s, "re-plan") for s in stops),
                             *(self._sleep(s, has_work, now) for s in sleeps))
        await settle(*self.dying)
        for slot in wake.values():
            await self._wake(slot)
        for key in new:
            if key[0] in has_work:
                self.start(key)
        # every engine starting now competes with the others for the cores (or the host): each
        # remembers the most it saw, so its measured start can be normalised to an alone start
        starting = [s for s in self.all if s.state is SlotState.STARTING]
        for s in starting:
            s.starting_with = max(s.starting_with, len(starting))

    def start(self, key: ReplicaKey) -> None:
        assert self.pool is not None
        model, tp, devices = key
        mc = self.cfg.model(model)
        assert mc is not None
        sid = next(self._sid)
        path = mc.resolved_path(self.cfg.base_dir)
        spec = EngineSpec(
            model=mc, model_path=path or Path("."), devices=devices,
            device_kind=engine_device_kind(self.pool.kind), tp=tp,
            kv_cache_gib=self.cfg.devices.cpu_kvcache_gib,
            gpu_memory_utilization=self.cfg.devices.gpu_memory_utilization,
            nice=self.cfg.devices.effective_engine_nice(self.pool.kind),
            confine=self.cfg.devices.confine_cpu_engines,
            log_path=self.state_dir / "logs" / f"{model}-tp{tp}-d{'-'.join(map(str, devices))}-{sid}.log")
        slot = Slot(sid, spec, limit=max(1, math.ceil(INFLIGHT_FACTOR * mc.max_num_seqs)))
        ends = [s.tail for s in self.all if s.model == model and s.state.active]
        slot.tail = ends.count(False) > ends.count(True)
        slot.launched_at = self.owner.clock.monotonic()
        self.all.append(slot)
        self.owner.emit("engine_start", **slot.describe())
        if path is None:
            self.owner.slot_start_failed(slot, f"model {model!r} has no `path` (plan-only model)")
            return
        slot.task = asyncio.create_task(dispatch.run_slot(slot, self.owner),
                                        name=f"slot-{sid}-{model}")

    async def stop(self, slot: Slot, why: str, force: bool = False) -> None:
        """Preempt: re-queue its requests, stop the dispatch loop, reap the engine. `force` also
        finishes a stop that an interrupted pass left half done."""
        if slot.state in (SlotState.STOPPED, SlotState.FAILED) or (
                slot.state is SlotState.STOPPING and not force):
            return
        resumed = slot.state is SlotState.STOPPING
        slot.move(SlotState.STOPPING)
        reqs = self._preempt(slot)
        if not resumed:
            self.owner.emit("engine_stop", **slot.describe(), why=why, requeued=len(reqs))
        t0 = self.owner.clock.monotonic()
        await stop_task(slot.task)
        if slot.engine is not None:
            await asyncio.shield(self.reap(slot.engine))
            if not resumed:  # what the next starts wait for (`planning.plan_problem`)
                self.owner.engine_stopped(self.owner.clock.monotonic() - t0)
        slot.move(SlotState.STOPPED)
        if slot in self.all:
            self.all.remove(slot)

    async def stop_all(self, why: str, force: bool = False) -> None:
        await asyncio.gather(*(self.stop(s, why, force) for s in list(self.all)),
                             return_exceptions=force)

    # -- warm engines between batches ---------------------------------------------------------------
    def _may_linger(self, slot: Slot, needed: set[int], busy: set[str], now: float) -> bool:
        return (self.cfg.devices.engine_linger_s > 0 and slot.model not in busy
                and not needed & set(slot.spec.devices) and self._linger_left(slot, now))

    def _linger_left(self, slot: Slot, now: float) -> bool:
        """Whether an engine idle since `slot.idle_since` (None: not idle) is within its linger time."""
        return slot.idle_since is None or now - slot.idle_since < self.cfg.devices.engine_linger_s

    def idle(self) -> list[Slot]:
        """Engines kept warm: running, their model without work."""
        return [s for s in self.all if s.idle_since is not None and s.state is SlotState.RUNNING]

    def asleep(self) -> list[Slot]:
        """Engines asleep, or awake as guests (out of the plan either way)."""
        return [s for s in self.all if s.state in (SlotState.SLEEPING, SlotState.GUEST)]

    def sleep_room(self) -> float | None:
        """What the engines a stage replaces may still hold asleep (bytes, the planner's
        `PlanningProblem.sleep_room`); None where they are stopped instead: not CPU, no budget,
        or engines that cannot freeze (Ray's)."""
        assert self.pool is not None
        if self.pool.kind != "cpu" or self.sleep_budget <= 0 or not self.owner.launcher.freezable:
            return None
        return max(0.0, self.sleep_budget - sum(s.sleep_bytes for s in self.asleep()))

    def linger_ends(self) -> float | None:
        """When the first warm or sleeping engine's linger time runs out (executor clock), if any."""
        ends = [s.idle_since + self.cfg.devices.engine_linger_s
                for s in self.idle() + self.asleep() if s.idle_since is not None]
        return min(ends, default=None)

    # -- sleep: GPU sleep mode, CPU frozen (see the module docstring, dispatch.sleep_engine) --------
    def _may_sleep(self, slot: Slot, needed: set[int], busy: set[str], now: float) -> bool:
        """Sleep instead of stop. GPU: an engine whose model has work left for later, on devices
        the new stage does not use (a sleeping engine still holds its CUDA context). CPU: a
        running engine that can freeze, unless its model has had no work for the linger time (the
        memory it would hold is checked by `_sleep`)."""
        if slot.spec.device_kind == "cpu":
            return (slot.state is SlotState.RUNNING and self.sleep_budget > 0
                    and slot.engine is not None and slot.engine.freezable
                    and (slot.model in busy or self._linger_left(slot, now)))
        return (self.cfg.devices.sleep_mode and slot.spec.device_kind == "cuda"
                and slot.model in busy and not needed & set(slot.spec.devices))

    def _sleep_ends(self, slot: Slot, needed: set[int], busy: set[str], now: float) -> bool:
        """Whether a sleeping engine is stopped now. GPU: its devices are needed or its model has
        no work left. CPU: its model has had no work for the linger time."""
        if slot.spec.device_kind != "cpu":
            return bool(needed & set(slot.spec.devices)) or slot.model not in busy
        if slot.model in busy:
            return False
        slot.idle_since = now if slot.idle_since is None else slot.idle_since
        return not self._linger_left(slot, now)

    async def _sleep(self, slot: Slot, busy: set[str], now: float) -> None:
        slot.move(SlotState.SLEEPING)
        reqs = self._preempt(slot)
        await stop_task(slot.task)
        slot.task = None
        engine = slot.engine
        assert engine is not None
        if slot.spec.device_kind == "cpu":
            slot.sleep_bytes = await asyncio.to_thread(engine.memory_bytes)
            self.slept_bytes[slot.model] = slot.sleep_bytes
            # after the reading: engines put to sleep together each see the others' memory
            held = sum(s.sleep_bytes for s in self.asleep() if s is not slot)
            if held + slot.sleep_bytes > self.sleep_budget:
                why = (f"re-plan; sleeping engines would hold {(held + slot.sleep_bytes) / 2**30:.1f}"
                       f" GiB, over [devices] cpu_sleep_gib")
                slot.sleep_bytes = 0
                await self.stop(slot, why)
                return
            if slot.model not in busy:  # stopped once its linger time is up (`_sleep_ends`)
                slot.idle_since = now if slot.idle_since is None else slot.idle_since
        if await dispatch.sleep_engine(engine):
            self.owner.emit("engine_sleep", **slot.describe(), requeued=len(reqs),
                            memory_gib=round(slot.sleep_bytes / 2**30, 2))
            self.guests.visit(slot.model)  # for small batches re-queued above (not woken asleep)
        else:
            await self.stop(slot, "sleep failed")

    async def _wake(self, slot: Slot) -> None:
        assert slot.engine is not None
        if slot.state is SlotState.GUEST:  # awake already: it joins the plan, all batches now
            self.guests.home(slot)
            slot.move(SlotState.RUNNING)
            slot.sleep_bytes, slot.idle_since = 0, None
            self.owner.emit("engine_wake", **slot.describe(), guest=True)
            slot.wake.set()
            return
        if await dispatch.wake_engine(slot.engine):
            slot.move(SlotState.RUNNING)
            slot.sleep_bytes, slot.idle_since = 0, None
            self.owner.emit("engine_wake", **slot.describe())
            self.rebalance(slot, self.owner.queues.count(slot.model))
            slot.task = asyncio.create_task(dispatch.serve_slot(slot, self.owner))
        else:
            await self.stop(slot, "wake failed")
            self.start(slot.key)
