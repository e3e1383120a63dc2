"""`PoolExecutor`: runs pooled batches on vLLM engines and re-plans at every real event.

One control task owns every engine start and stop. Events (a batch submitted, a model's queue
drained, an engine died or failed to start, a cancel) are coalesced into *passes*, arrivals paced
(`runtime.executor.passes`); each pass builds a planning problem from the observed state
(`runtime.executor.planning`), calls the planner and applies only the FIRST stage of the returned
schedule: engines whose (model, tp, devices) are unchanged keep running, the others are stopped
(their in-flight requests go back to the queue and are re-run from scratch), the new ones start
concurrently (`runtime.executor.slots`). Later stages are re-decided at the next event, with what
has been learned since. Pools: batches of one strategy are planned together; batches of another
strategy wait for the pool ahead of them (FIFO by submission, `runtime.executor.pool_state`).

Each engine replica pulls from its model's shared queue (`runtime.executor.dispatch`). A request is
done once its batch's sink returned; its output length then updates the `LengthModel`. Every answer
is also an observation of its engine's speed (queued, sent, answered on the executor's clock;
tokens): before each plan the latency model is refitted to them, and all that is learned (lengths,
engine starts, calibration) is saved under the state dir at each pass and survives restarts
(`runtime.executor.learned`).

Storage: a request counts only once its outcome is durable (the sink returned); while the sink
raises, outcomes are retried and dispatch pauses (`runtime.executor.outcome_store`).

Failures: an engine that dies has its in-flight requests re-queued (each at most
`limits.max_retries` times, then an `engine_failed` error outcome) and the pass restarts one; an engine
that fails to start turns every queued request of its model into an `engine_start_failed` error
(other models keep running); a cluster node that leaves (`nodes_changed`) is an engine death for
each engine on it, and a start on a node gone is one too (`NodeLost`), never a failed start; a
4xx answer is that request's error, never retried; a model the planner cannot place at all gets
`planning_failed` errors. Events of each batch (plans with their
reasons, predicted makespan and its lower bound, engine start/started/stop/failed, model finished, ...) are kept for
`events(batch_id)` and logged.

Long: the executor's control loop and every event it reacts to (submit, cancel, engine
started/failed/died, node changes, outcomes delivered, dependents released) in one place, so their
ordering can be read together; slots, dispatch, request state, planning, the pacing of passes and
the storing of outcomes live in their own modules.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import weakref
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence

from runtime.clock import SYSTEM, Clock
from runtime.config import STRATEGIES, Config
from runtime.engines.devices import NodeChange, discover_pool
from runtime.executor.deps import DEPENDENCY_FAILED, BatchGraph
from runtime.executor.dispatch import Slot, SlotState
from runtime.engines.engine import Launcher
from runtime.executor_api import EventSink, Outcome, OutcomeSink, WorkItem
from runtime.persist import alone_start_s
from runtime.executor.pool_state import BatchState, Pool, Req, ReqState, batch_reqs
from runtime.executor.autoprofile import AutoProfiler, ProfileLaunch, missing_shapes
from runtime.executor.deadlines import Deadlines
from runtime.executor.learned import Learned
from runtime.executor.outcome_store import OutcomeStore
from runtime.executor.passes import Passes
from runtime.executor.queues import ModelQueues, serving_order
from runtime.executor.planning import (batch_completion, describe_schedule, describe_stage,
                                       lower_bound, model_specs, plan_problem,
                                       pending_record, running_plans, served_record)
from runtime.executor.slots import EngineSlots, settle
from scheduler.planner import PlanningProblem, plan
from scheduler.served import Pending, ShapeKey
from scheduler.types import DevicePool, Schedule
from scheduler.unserved import shape_name

log = logging.getLogger(__name__)
KEEP_FINISHED_BATCHES = 1000  # finished batches whose events stay available

Planner = Callable[[PlanningProblem, str], Schedule]
# what a pass plans: requests queued, sent, or waiting for upstream ones (their start is predicted)
PLANNED = (ReqState.WAITING, ReqState.QUEUED, ReqState.INFLIGHT)


def infeasible_models(planner: Planner, problem: PlanningProblem, strategy: str) -> set[str]:
    """The models the planner cannot plan even alone (so that one model that fits no device does
    not fail the others' requests). Empty when each plans alone: the failure is not one model's."""
    bad = set()
    for m in problem.work:
        alone = dataclasses.replace(problem, models={m: problem.models[m]},
                                    work={m: problem.work[m]},
                                    running={k: v for k, v in problem.running.items() if k == m})
        try:
            planner(alone, strategy)
        except Exception:
            bad.add(m)
    return bad


class PoolExecutor:
    """The `runtime.executor_api.Executor` implementation (see the module docstring)."""

    def __init__(self, cfg: Config, launcher: Launcher, *, planner: Planner = plan,
                 state_dir: Path | None = None, pool: DevicePool | None = None,
                 clock: Clock = SYSTEM, profile_launch: ProfileLaunch | None = None) -> None:
        self.cfg = cfg
        self.clock = clock
        self.launcher = launcher
        self.deadlines = Deadlines()  # completion windows: batches at risk are moved up
        self.queues = ModelQueues(cfg.scheduler.fairness, self.deadlines.urgent, self.batch_open)
        self.pool = pool  # None: discovered by start()
        self.state_dir = Path(state_dir) if state_dir is not None else cfg.state_dir
        self._planner = planner
        self._specs = model_specs(cfg, pool.kind if pool is not None else None)
        # output lengths, engine starts, served requests and calibration (`learned`)
        self.learned = Learned(cfg, self.state_dir)
        self._batches: dict[str, BatchState] = {}
        self._pools: list[Pool] = []  # FIFO; the head is the active one
        self._delivering: set[asyncio.Task] = set()
        self.slots = EngineSlots(cfg, self, self.state_dir)
        self.slots.pool = pool
        self.passes = Passes(clock, self)  # the reasons for the next pass, paced (`passes`)
        self._control: asyncio.Task | None = None
        self._closing = False
        self._queued_at: weakref.WeakKeyDictionary[Req, float] = weakref.WeakKeyDictionary()
        # outcomes until durable; dispatch paused while one is not (`outcome_store`)
        self.outcomes = OutcomeStore(clock, self.emit, lambda: self.slots.wake())
        self._linger: asyncio.Task | None = None  # wakes a pass when a warm engine's time is up
        self._to_visit: set[str] = set()  # models whose sleeping engine may wake as a guest
        # `[scheduler] auto_profile = "idle"`: profiles missing shapes while idle (start())
        self._profile_launch = profile_launch
        self.auto_profile: AutoProfiler | None = None
        self._gateway_live = 0  # the gateway's live batches (`gateway_batches`)
        self._listeners: list[EventSink] = []  # told of every event (`listen`)
        self._nodes: list[dict[str, Any]] | None = None  # a cluster's nodes (`nodes_changed`)

    @property
    def dispatch_paused(self) -> bool:
        return self.outcomes.paused

    # -- Executor protocol -----------------------------------------------------------------------
    async def start(self) -> None:
        if self.pool is None:
            self.pool = self.slots.pool = discover_pool(self.cfg)
            self._specs = model_specs(self.cfg, self.pool.kind)
        await self.launcher.start()  # spare engine processes, /dev/shm left by a predecessor
        self._control = asyncio.create_task(self._control_loop(), name="executor-control")
        if self.cfg.scheduler.auto_profile == "idle" and self._profile_launch is not None:
            pool = self.pool
            self.auto_profile = AutoProfiler(
                lambda: missing_shapes(self.cfg, pool, self._specs, self.state_dir),
                self._profile_launch, self._idle, self.clock,
                lambda kind, **data: self.emit(kind, [], **data))
            self.auto_profile.start()
        log.info("executor ready: %s devices %s", self.pool.kind, list(self.pool.ids))

    def submit(self, batch_id: str, items: Sequence[WorkItem], sink: OutcomeSink,
               strategy: str | None = None, known: Mapping[str, Outcome] | None = None,
               deadline_at: float | None = None) -> None:
        if self._closing:
            raise RuntimeError("executor is closed")
        if self.auto_profile is not None:  # the devices are the batch's from now on
            self.auto_profile.stop()
        strategy = strategy or self.cfg.scheduler.strategy
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
        old = self._batches.get(batch_id)
        if old is not None and not old.finished.is_set():
            raise ValueError(f"batch {batch_id} is already running")
        batch = BatchState(batch_id, sink, strategy, batch_reqs(batch_id, items))
        doomed: dict[Req, str] = {}
        if any(it.depends_on for it in items):
            batch.graph = BatchGraph(batch.reqs, known)
            doomed = dict(batch.graph.doomed)
        self._batches[batch_id] = batch
        self.deadlines.add(batch_id, deadline_at)
        if self._pools and self._pools[-1].strategy == strategy:
            pool = self._pools[-1]
        else:
            pool = Pool(strategy)
            self._pools.append(pool)
        pool.batches.append(batch)
        self.emit("batch_submitted", [batch], requests=len(batch.reqs), strategy=strategy,
                   pooled_with=[b for b in pool.batch_ids if b != batch_id])
        for req in batch.reqs:
            if self.cfg.model(req.model) is None:
                self._leave_waiting(batch, req)
                self._fail_queued(req, "model_not_found", f"model {req.model!r} is not configured")
            elif req in doomed:  # an upstream request failed before a restart
                self._fail_queued(req, DEPENDENCY_FAILED, doomed[req])
            elif req.state is ReqState.WAITING:
                if pool.active:
                    self._count_waiting(req.model, 1)
            elif pool.active:
                self.push(req)
        batch.check_finished()
        self._request_pass(f"batch_submitted:{batch_id}")

    async def cancel(self, batch_id: str) -> None:
        batch = self._batches.get(batch_id)
        if batch is None or batch.finished.is_set():
            return
        batch.cancelled = True
        self.outcomes.retry_now()  # its stalled outcomes stop waiting for the disk
        aborted: list[asyncio.Task] = []
        for slot in self.slots:
            for req in [r for r in slot.inflight if r.batch_id == batch_id]:
                task = slot.inflight.pop(req)
                req.cancel()
                task.cancel()
                aborted.append(task)
            slot.wake.set()
        for req in batch.reqs:
            if req.state in (ReqState.QUEUED, ReqState.WAITING):
                self._leave_waiting(batch, req)
                req.cancel()
        self.queues.purge()
        self.emit("batch_cancelled", [batch], aborted=len(aborted))
        batch.finished.set()
        # wait for aborted requests and for outcomes being delivered; then let a pass free engines
        pending = [r.task for r in batch.reqs if r.task is not None and not r.task.done()]
        await settle(*aborted, *pending)
        await self._request_pass(f"batch_cancelled:{batch_id}")

    async def wait(self, batch_id: str) -> None:
        await self._batches[batch_id].finished.wait()

    def events(self, batch_id: str) -> list[dict[str, Any]]:
        batch = self._batches.get(batch_id)
        return list(batch.events) if batch else []

    def listen(self, sink: EventSink) -> None:
        self._listeners.append(sink)

    def gateway_batches(self, live: int) -> None:
        """The gateway's live batches (validating, in progress or finalizing), told whenever their
        number changes: a batch is known there before it is validated and submitted here, and
        background profiling stops at once when one is created."""
        self._gateway_live = live
        if live and self.auto_profile is not None:
            self.auto_profile.stop()

    def _idle(self) -> bool:
        """Nothing runs or is about to: no live batch at the gateway, no open pool, no engine up
        or stopping (what background profiling waits for)."""
        return not (self._closing or self._gateway_live or any(p.has_open() for p in self._pools)
                    or self.slots.all or self.slots.dying)

    async def close(self) -> None:
        self._closing = True
        if self.auto_profile is not None:
            await self.auto_profile.close()
        self.outcomes.close()
        if self._linger is not None:
            self._linger.cancel()
        if self._control is not None:
            self._control.cancel()
            await asyncio.gather(self._control, return_exceptions=True)
        # the cancelled pass may have left slots half-stopped: finish every one of them here
        slots = list(self.slots)
        await self.slots.stop_all("close", force=True)
        # outcomes already answered are still delivered (the gateway closes its journals after us)
        reporting = [r.task for b in self._batches.values() for r in b.reqs
                     if r.state is ReqState.REPORTING]
        await settle(*(s.task for s in slots), *self.slots.dying, *self._delivering, *reporting)
        await self.launcher.close()
        await self._calibrate()
        await self.learned.save()
        self.passes.close()

    def health(self) -> dict[str, Any]:
        now = self.clock.monotonic()
        out: dict[str, Any] = {"idle_engines": [
            {"model": s.model, "tp": s.spec.tp, "devices": list(s.spec.devices),
             "idle_s": round(now - s.idle_since, 1)} for s in self.slots.idle()
            if s.idle_since is not None], "sleeping_engines": [
            {"model": s.model, "tp": s.spec.tp, "devices": list(s.spec.devices),
             "memory_gib": round(s.sleep_bytes / 2**30, 2), "guest": s.state is SlotState.GUEST}
            for s in self.slots.asleep()]}
        spares = self._spares()
        if spares is not None:  # ready = an engine start now skips the API server's import
            out["spare_engines"] = {"ready": spares.ready_count(), "target": spares.size,
                                    "import_s": round(spares.import_s(), 2)}
        if self.auto_profile is not None:
            out["auto_profile"] = self.auto_profile.health()
        if self._nodes is not None:
            out["nodes"] = self._nodes
        return out

    def nodes_changed(self, change: NodeChange) -> None:
        """The cluster's nodes changed (`runtime.engines.ray_launcher`): plan on `change.pool`
        from now on. An engine on a node that left is dead (its in-flight requests re-queued,
        bounded retries); a re-plan places what ran there on the nodes left, or on new ones."""
        self.pool = self.slots.pool = change.pool
        self._nodes = [p.describe() for p in change.nodes] + [
            {"node": n.node_id, "address": n.address, "device_kind": n.kind, "devices": [],
             "unused": f"another device kind than the pool's ({change.pool.kind})"}
            for n in change.unused]
        for p in change.joined:
            self.emit("node_joined", **p.describe())
        for p in change.left:
            self.emit("node_left", **p.describe())
            lost = set(p.ids)
            for slot in [s for s in self.slots if s.state.active and lost & set(s.spec.devices)]:
                self.slot_died(slot, f"its node {p.node.node_id[:12]} ({p.node.address}) left "
                                     "the cluster")
        if change.joined or change.left:
            self._request_pass("nodes_changed")

    def _spares(self) -> Any:
        return self.launcher.spares  # runtime.engines.spares.SparePool, when configured

    def _spare_state(self) -> tuple[tuple[float, ...] | None, float]:
        """For the planner: per spare engine process, the import it has left (0: ready; None: the
        gateway keeps none, or its zygote is ready and every start finds a spare, forked at once),
        and what a start without one costs more (the API server's import)."""
        spares = self._spares()
        if spares is None or spares.size <= 0 or spares.forks_ready():
            return None, 0.0
        return spares.import_left(), spares.import_s()

    # -- what dispatch.SlotHost asks of us --------------------------------------------------------
    def slot_started(self, slot: Slot) -> None:
        assert slot.engine is not None
        start_s = slot.engine.start_time_s
        alone_s = None
        if isinstance(start_s, (int, float)) and start_s > 0:
            assert self.pool is not None
            key = (slot.model, slot.spec.tp, slot.spec.threads)
            # stored as the alone start: the planner multiplies it by the contention factor again
            alone_s = alone_start_s(start_s, self.pool.start_factor(slot.starting_with))
            spares = self._spares()
            if spares is not None and not slot.engine.spare_used:
                # stored as a start in a spare (what the planner assumes while one is ready)
                alone_s = max(1.0, alone_s - spares.import_s())
            self.learned.engine_started(key, alone_s)
        self.emit("engine_started", **slot.describe(), start_s=start_s,
                   starting_with=slot.starting_with, alone_start_s=alone_s,
                   spare=slot.engine.spare_used)
        self.slots.rebalance(slot, self.queues.count(slot.model))

    def slot_start_failed(self, slot: Slot, message: str) -> None:
        self.slots.fail(slot)
        self.emit("engine_start_failed", **slot.describe(), message=message[-2000:])
        log.error("engine for %s on %s failed to start:\n%s", slot.model, slot.spec.devices, message)
        for req in self.queues.drain(slot.model):
            self._fail_queued(req, "engine_start_failed", message)
        self._request_pass(f"engine_start_failed:{slot.model}")

    def slot_died(self, slot: Slot, message: str) -> None:
        if not (slot.state.active or slot.state.serving):
            return  # already stopping (we asked) or handled
        reqs = self.slots.fail(slot)
        self.emit("engine_failed", **slot.describe(), message=message, requeued=len(reqs))
        log.error("engine for %s on %s died: %s", slot.model, slot.spec.devices, message)
        for req in reqs:
            req.requeue()
            req.failures += 1
            if req.failures > self.cfg.limits.max_retries:
                self._fail_queued(req, "engine_failed",
                                  f"the engine died {req.failures} times under this request; "
                                  f"last: {message}")
        for req in reversed([r for r in reqs if r.state is ReqState.QUEUED]):
            self.push(req, front=True)
        if slot.task is not None and slot.task is not asyncio.current_task():
            slot.task.cancel()
        if slot.engine is not None:  # reap the process group; its devices are busy until then
            self.slots.reap(slot.engine)
        self._request_pass(f"engine_failed:{slot.model}")

    def request_dropped(self, slot: Slot, req: Req, message: str) -> None:
        """A live engine's connection broke before the answer came: run the request again (vLLM
        aborted it when the connection closed), up to the same bound as an engine death."""
        req.requeue()
        req.failures += 1
        slot.wake.set()
        log.warning("request %s on %s lost its connection (%s); %s", req.item.custom_id, slot.model,
                    message, "giving up" if req.failures > self.cfg.limits.max_retries else "re-queued")
        if req.failures > self.cfg.limits.max_retries:
            self._fail_queued(req, "engine_error", f"the connection to the engine broke "
                              f"{req.failures} times under this request; last: {message}")
        else:
            self.push(req, front=True)

    def requests_preempted(self, slot: Slot, reqs: list[Req], by: list[Req]) -> None:
        """Running requests aborted so that small batches' (`by`) run at once (`seats`): back at
        the head of their batch's queue, in order (`slots.EngineSlots.requeue`)."""
        self.slots.requeue(slot, reqs)
        self.emit("requests_preempted", model=slot.model, slot=slot.sid, requeued=len(reqs),
                  for_batches=sorted({r.batch_id for r in by}),
                  preempted_batches=sorted({r.batch_id for r in reqs}))

    def batch_open(self, batch_id: str) -> int:
        batch = self._batches.get(batch_id)
        return batch.open_count if batch is not None and not batch.finished.is_set() else 0

    def batch_size(self, batch_id: str) -> int:
        """A batch's size as the seats compare batches (`seats`): what it has open in all, on
        every model, to a power of two as a request's `priority` is; -1 when it was moved up for
        its deadline (`deadlines`)."""
        if batch_id in self.queues.urgent:
            return -1
        return self.batch_open(batch_id).bit_length()

    def inflight_cap(self, slot: Slot) -> int:
        return self.slots.inflight_cap(slot, self.queues.count(slot.model))

    def check_drained(self, model: str) -> None:
        if self.queues.finish_signalled.get(model, True) or self.queues.has_queued(model):
            return
        if self.queues.waiting.get(model, 0) > 0:  # requests wait for upstream ones: not finished
            return
        if any(s.inflight for s in self.slots if s.model == model):
            return
        self.queues.finish_signalled[model] = True
        self.emit("model_finished", model=model)
        # a model no engine of the plan serves (a guest's: out of the plan) changes no plan
        if any(s.model == model and s.state.active for s in self.slots):
            self._request_pass(f"model_finished:{model}")

    async def finish(self, req: Req, outcome: Outcome) -> None:
        req.report()
        await self._deliver(req, outcome)

    # -- requests ------------------------------------------------------------------------------
    def push(self, req: Req, front: bool = False) -> None:
        self._queued_at[req] = self.clock.monotonic()
        self.queues.push(req, front)
        self.slots.wake(req.model)
        self._visit_soon(req.model)

    def _visit_soon(self, model: str) -> None:
        """Once the requests being queued now are all in (a batch's first request alone looks
        like a small batch), let a small batch of `model` wake its sleeping engine as a guest
        (`guests.Guests.visit`)."""
        if not self._to_visit:
            asyncio.get_running_loop().call_soon(self._visit)
        self._to_visit.add(model)

    def _visit(self) -> None:
        models, self._to_visit = self._to_visit, set()
        if not self._closing:
            for model in models:
                self.slots.guests.visit(model)

    def requests_aborted(self, slot: Slot, reqs: list[Req]) -> None:
        """`reqs`, in flight on `slot`, were aborted (preempted, moved to another replica, or
        their engine put to sleep): it did work no answer will record, which the online
        calibration must not read as a slower engine (`ServedLog.interrupt`)."""
        sent = [r.sent_s for r in reqs if r.sent_s is not None]
        if sent and self.cfg.scheduler.online_calibration:
            self.learned.served.interrupt(self._shape_key(slot), slot.sid, min(sent))

    def _shape_key(self, slot: Slot) -> ShapeKey:
        """The engine shape `slot` runs, as the online calibration keys it."""
        assert self.pool is not None
        return (slot.model, slot.spec.tp, slot.spec.threads, self.pool.signature)

    def engine_stopped(self, seconds: float) -> None:
        self.learned.engine_stopped(seconds)

    def request_served(self, slot: Slot, req: Req, sent_s: float, body: dict[str, Any]) -> None:
        """An engine answered `req` (sent at `sent_s`), just now: an observation of its speed."""
        if not self.cfg.scheduler.online_calibration:
            return
        now = self.clock.monotonic()
        served = served_record(body, req.item.prompt_tokens, self._queued_at.get(req, sent_s),
                               sent_s, now)
        if served is not None:
            self.learned.served.add(self._shape_key(slot), slot.sid, served)

    def _fail_queued(self, req: Req, code: str, message: str) -> None:
        """An error outcome for a request that no engine will answer."""
        req.report()
        outcome = Outcome(custom_id=req.item.custom_id, line=req.item.line, model=req.model,
                          status_code=None, error={"code": code, "message": message},
                          attempts=req.attempts)
        task = asyncio.create_task(self._deliver(req, outcome))
        req.task = task
        self._delivering.add(task)
        task.add_done_callback(self._delivering.discard)

    async def _deliver(self, req: Req, outcome: Outcome) -> None:
        batch = self._batches[req.batch_id]
        if outcome.ok:
            self.learned.observe(req, outcome)
        if not await self.outcomes.store(batch, req, outcome):
            if batch.cancelled:  # reported as never run; counted like the cancelled ones
                req.abandon()
                self._forget(batch)
            return  # shutting down: not journaled, so it runs again after the restart
        req.done()
        batch.closed_one()
        if batch.graph is not None and not batch.cancelled:
            self._release_dependents(batch, req, outcome)
        if not batch.cancelled and batch.check_finished():
            self.emit("batch_finished", [batch])
        if batch.finished.is_set():
            self._forget(batch)
        if self._pools and batch in self._pools[0].batches and not self._pools[0].has_open():
            self._request_pass("pool_finished")

    def _arm_linger(self) -> None:
        """Ask for a pass when the first warm engine's linger time runs out (it is then stopped)."""
        ends = self.slots.linger_ends()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if ends is None or self._closing:
            return

        async def expire(delay: float) -> None:
            await self.clock.sleep(delay)
            self._linger = None
            self._request_pass("linger_expired")
        self._linger = asyncio.create_task(expire(max(0.0, ends - self.clock.monotonic()) + 0.01),
                                           name="executor-linger")

    # -- dependent requests (runtime.executor.deps) ------------------------------------------------
    def _head_active(self, batch: BatchState) -> bool:
        return bool(self._pools) and self._pools[0].active and batch in self._pools[0].batches

    def _count_waiting(self, model: str, n: int) -> None:
        self.queues.waiting[model] = self.queues.waiting.get(model, 0) + n

    def _leave_waiting(self, batch: BatchState, req: Req) -> None:
        """`req` stops waiting for its upstream requests (released, failed or cancelled)."""
        if req.state is not ReqState.WAITING:
            return
        if batch.graph is not None:
            batch.graph.forget(req)
        if self._head_active(batch):
            self._count_waiting(req.model, -1)

    def _release_dependents(self, batch: BatchState, req: Req, outcome: Outcome) -> None:
        """`req`'s outcome is durable: queue the dependents it completed, fail those it cannot feed."""
        change = batch.graph.finished(req, outcome)
        for dep, message in change.failed:
            self._leave_waiting(batch, dep)
            self._fail_queued(dep, DEPENDENCY_FAILED, message)
        models = set()
        for dep in change.ready:
            self._leave_waiting(batch, dep)
            dep.release()
            if self._head_active(batch):
                self.push(dep)
                models.add(dep.model)
        # a released model with no engine needs a pass to get one (one with an engine just goes on)
        for m in sorted(models):
            if not any(s.model == m and s.state.active for s in self.slots):
                self._request_pass(f"released:{m}")
            self.check_drained(m)

    async def _calibrate(self) -> None:
        if self.pool is not None:
            await self.learned.calibrate(self.pool, self._specs, self._in_flight())

    def _in_flight(self) -> dict[tuple[ShapeKey, Hashable], list[Pending]]:
        """Per (engine shape, run) the requests in flight now: a refit replays them beside the
        answers they shared steps with (`ServedLog.snapshot`)."""
        out: dict[tuple[ShapeKey, Hashable], list[Pending]] = {}
        for slot in self.slots:
            reqs = [pending_record(r, self._queued_at.get(r, math.inf)) for r in slot.inflight]
            if sent := [p for p in reqs if p is not None]:
                out[(self._shape_key(slot), slot.sid)] = sent
        return out

    def _forget(self, batch: BatchState) -> None:
        """Drop a finished batch's requests (its events stay for `events()`); bound the history."""
        if any(r.state is ReqState.REPORTING for r in batch.reqs):
            return  # outcomes still being delivered: forgotten after the last one
        batch.reqs = []
        self.deadlines.forget(batch.batch_id)
        done = [b for b, st in self._batches.items() if st.finished.is_set() and not st.reqs]
        for b in done[:max(0, len(done) - KEEP_FINISHED_BATCHES)]:
            del self._batches[b]

    # -- control ----------------------------------------------------------------------------------
    def _request_pass(self, reason: str) -> asyncio.Future:
        """Ask the control task for a re-plan; the future resolves when a pass after now completed."""
        return self.passes.ask(reason)

    async def _control_loop(self) -> None:
        while True:
            reasons, waiters = await self.passes.next()  # paced (`passes`)
            try:
                if self.passes.needed(reasons):
                    await self._pass(reasons)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("executor pass failed (reasons %s)", reasons)
            finally:
                self.passes.done(waiters)

    # -- what passes.PassHost asks of us -----------------------------------------------------------
    def serving(self) -> bool:
        """Whether some engine has requests in flight."""
        return any(s.inflight for s in self.slots)

    def finished_event(self, batch_id: str) -> asyncio.Event | None:
        batch = self._batches.get(batch_id)
        return batch.finished if batch is not None else None

    def served_at_once(self, batch_id: str) -> bool:
        """Whether the batch needs no plan: in the active pool, nothing of it waiting for upstream
        requests, and small (`seats`) on an engine of each of its models that is up and serving
        (in the plan, or a guest)."""
        batch = self._batches.get(batch_id)
        if batch is None or not self._pools or not self._pools[0].active \
                or batch not in self._pools[0].batches:
            return False
        reqs = batch.open_reqs
        if any(r.state is ReqState.WAITING for r in reqs):
            return False
        return all(self.slots.serves_small(m, batch.batch_id) for m in {r.model for r in reqs})

    def _active_pool(self) -> Pool | None:
        """Retire finished pools; activate the next one (its requests enter the queues)."""
        while self._pools and not self._pools[0].has_open():
            for batch in self._pools.pop(0).batches:
                self._forget(batch)
        if not self._pools:
            return None
        head = self._pools[0]
        if not head.active:
            head.active = True
            for batch in head.batches:
                for req in batch.reqs:
                    if req.state is ReqState.QUEUED:
                        self.push(req)
                    elif req.state is ReqState.WAITING:
                        self._count_waiting(req.model, 1)
        return head

    async def _pass(self, reasons: list[str]) -> None:
        head = self._active_pool()
        todo = self.deadlines.first(serving_order(
            [r for r in head.open_reqs() if r.state in PLANNED], self.queues)) if head else []
        if not todo:  # nothing left to run: engines stay warm a while, then their devices are freed
            await self.slots.apply(None, set(), self.clock.monotonic())
            self._arm_linger()
            await self._calibrate()
            await self.learned.save()
            return
        assert head is not None
        has_work = {r.model for r in todo}
        # the small batches a guest serves are out of the plan, as the guest is (`Guests.takes`)
        todo = [r for r in todo if not self.slots.guests.takes(r.model, r.batch_id)]
        schedule = await self._plan(head, todo, reasons) if todo else None
        if schedule is None and todo:
            return
        await self.slots.apply(schedule.stages[0] if schedule and schedule.stages else None,
                               has_work, self.clock.monotonic())
        self._arm_linger()
        if not self.slots.any_active() and not self.slots.dying and not self.passes.reasons:
            # nothing runs and nothing will produce an event: the plan left queued work stranded.
            # Not when a pass is already asked for: an engine died or a node left while this one
            # applied its plan, and the next one plans for that (it failed them on 5 Dec).
            for req in [r for r in head.open_reqs() if r.state is ReqState.QUEUED
                        and not self.slots.guests.takes(r.model, r.batch_id)]:
                self._fail_queued(req, "planning_failed", "the plan runs no engine for this model")

    async def _plan(self, head: Pool, todo: list[Req], reasons: list[str]) -> Schedule | None:
        assert self.pool is not None
        head.plans += 1
        await self._calibrate()
        await self.learned.save()
        alive = self.slots.active_keys()
        ready, no_spare_s = self._spare_state()
        problem = plan_problem(self.cfg, self.pool, self._specs, self.state_dir, todo,
                               self.learned.lengths, self.learned.start_times, head.plans,
                               running_plans(alive), ready, no_spare_s, self.learned.fits,
                               self.slots.starting(self.clock.monotonic()), self.learned.stop_s,
                               running_plans(s.key for s in self.slots.asleep()),
                               self.slots.sleep_room(), self.slots.slept_bytes)
        work = problem.work
        t0 = self.clock.monotonic()
        try:
            schedule = await asyncio.to_thread(self._planner, problem, head.strategy)
        except Exception as exc:  # e.g. InfeasibleError: a model fits no plan on these devices
            log.exception("planner failed (%s)", head.strategy)
            bad = await asyncio.to_thread(infeasible_models, self._planner, problem, head.strategy)
            self.emit("plan_failed", strategy=head.strategy, message=str(exc),
                       models=sorted(bad or work))
            for req in [r for r in todo if r.state is ReqState.QUEUED]:
                if not bad or req.model in bad:
                    self._fail_queued(req, "planning_failed", f"{type(exc).__name__}: {exc}")
            if bad and set(work) - bad:
                self._request_pass("planning_failed")  # plan the others without them
            return None
        first = schedule.stages[0] if schedule.stages else None
        # each open batch's predicted completion, computed where the planner ran (`plan`)
        done = batch_completion(schedule)
        bound = lower_bound(schedule)
        self.emit("plan" if head.plans == 1 else "replan", strategy=head.strategy,
                   reasons=reasons, stage=describe_stage(first) if first else [],
                   stages=len(schedule.stages), schedule=describe_schedule(schedule),
                   predicted_makespan_s=schedule.makespan_s,
                   **({} if bound is None else {"lower_bound_s": bound}),
                   **({} if done is None else {"batches_predicted_s": done}),
                   planning_time_s=round(self.clock.monotonic() - t0, 4),
                   # what the online calibration held (why a prediction moved between passes)
                   calibration={f"{k[0]} {shape_name(k)}": [round(f.token_scale, 3),
                                                            round(f.step_scale, 3), f.served]
                                for k, f in sorted(self.learned.fits.items())},
                   remaining={m: len(w) for m, w in work.items()},
                   running=[{"model": k[0], "tp": k[1], "devices": list(k[2])} for k in alive])
        for kind, bid, data in self.deadlines.check(self.clock.time(), head.plans, done or {}):
            self.emit(kind, [self._batches[bid]], batch=bid, **data)
        return schedule

    # -- events -----------------------------------------------------------------------------------
    def emit(self, kind: str, batches: list[BatchState] | None = None, **data: Any) -> None:
        """Record an event for `batches` (default: every batch of the active pool) and log it."""
        if batches is None:
            batches = [b for b in self._pools[0].batches if not b.finished.is_set()] \
                if self._pools else []
        event = {"time": round(self.clock.time(), 3), "event": kind, **data}
        for b in batches:
            b.events.append(event)
        for sink in self._listeners if batches else ():
            try:
                sink([b.batch_id for b in batches], event)
            except Exception:
                log.exception("event listener failed on %s", kind)
        log.info("%s %s", kind, {k: v for k, v in data.items() if k != "message"} | (
            {"batches": [b.batch_id for b in batches]}))
