"""One engine replica ("slot") and the loop that feeds it from its model's shared queue.

A slot launches its engine, then keeps about `limit` (1.5 × max_num_seqs) requests in flight: enough to
keep vLLM's running batch full while later requests stay in the shared queue, where the other DP
replicas of the model (and a re-plan) can still take them. Each request is one task awaiting
`Engine.post`; cancelling that task aborts the request inside vLLM (the HTTP connection closes).

Ownership rule that keeps every request accounted for exactly once: whoever removes a request from
`slot.inflight` owns it. A request task that got its answer pops itself and reports the outcome; a
stopper (preemption, engine death, cancel) pops the requests synchronously, then cancels their tasks and
decides their fate (re-queue, error outcome, drop).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from runtime.clock import Clock, wait_event
from runtime.endpoints import GENERATING
from runtime.engines.engine import Engine, EngineDied, EngineSpec, Launcher, NodeLost
from runtime.executor_api import Outcome
from runtime.executor.pool_state import Req
from runtime.executor.queues import ModelQueues
from runtime.executor.seats import InFlight

log = logging.getLogger(__name__)
DEATH_GRACE_S = 3.0  # how long a 5xx / dropped connection waits for the engine process to exit


class SlotState(enum.IntEnum):
    STARTING = 0
    RUNNING = 1
    # asleep, out of the plan, its devices usable by others: on GPUs vLLM's sleep mode level 1
    # (weights offloaded), on CPU frozen (`Engine.freeze`: no CPU, its memory kept)
    SLEEPING = 2
    STOPPING = 3
    STOPPED = 4
    FAILED = 5
    # a CPU engine thawed beside the stage's engines, on cores they use, to serve small batches of
    # its model only; out of the plan; asleep again when they are done (`guests.Guests.visit`)
    GUEST = 6

    @property
    def active(self) -> bool:
        """Part of the plan being carried out (what a re-plan keeps or changes)."""
        return self in (SlotState.STARTING, SlotState.RUNNING)

    @property
    def serving(self) -> bool:
        """Its dispatch loop sends requests: an engine death there is the executor's to handle."""
        return self in (SlotState.RUNNING, SlotState.GUEST)


# Who may follow whom. STOPPING -> STOPPING: a stop that an interrupted pass left half done is
# finished by `close()` (`EngineSlots.stop(force=True)`). STOPPED and FAILED are final. A guest
# joins the plan (RUNNING) when a stage wants its engine where it is.
SLOT_MOVES: dict[SlotState, tuple[SlotState, ...]] = {
    SlotState.STARTING: (SlotState.RUNNING, SlotState.STOPPING, SlotState.FAILED),
    SlotState.RUNNING: (SlotState.SLEEPING, SlotState.STOPPING, SlotState.FAILED),
    SlotState.SLEEPING: (SlotState.RUNNING, SlotState.GUEST, SlotState.STOPPING),
    SlotState.GUEST: (SlotState.SLEEPING, SlotState.RUNNING, SlotState.STOPPING,
                      SlotState.FAILED),
    SlotState.STOPPING: (SlotState.STOPPING, SlotState.STOPPED),
    SlotState.STOPPED: (),
    SlotState.FAILED: (),
}


class SlotTransitionError(RuntimeError):
    """A slot was moved to a state that may not follow its own (a bug in the executor)."""


@dataclass(eq=False)
class Slot:
    sid: int
    spec: EngineSpec
    limit: int  # requests kept in flight
    state: SlotState = SlotState.STARTING
    engine: Engine | None = None
    # its requests in flight and its hold for small batches: `seats.InFlight` (max_num_seqs seats)
    inflight: InFlight = field(init=False)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None  # launch, then the dispatch loop
    # most engines seen starting at once while this one started (itself included): its measured
    # start is divided by the pool's contention factor for that many (`slots.EngineSlots.apply`)
    starting_with: int = 1
    # when its model ran out of work (None: it has work): an idle engine kept warm for the next
    # batch of its model (`[devices] engine_linger_s`, `slots.EngineSlots.apply`)
    idle_since: float | None = None
    launched_at: float = 0.0  # when its start began (executor clock): what a re-plan still waits for
    sleep_bytes: int = 0  # what it holds in memory asleep on CPU (`slots.EngineSlots._sleep`)
    # a guest's cores while it visits (`guests.Guests.visit`); its own are `spec.devices`
    guest_cores: tuple[int, ...] = ()
    # takes its model's requests from the queue's end (every other replica of a model: prefix
    # affinity, `ModelQueues.pop`)
    tail: bool = False

    def __post_init__(self) -> None:
        self.inflight = InFlight(self.spec.model.max_num_seqs)

    def move(self, to: SlotState) -> None:
        if to not in SLOT_MOVES[self.state]:
            raise SlotTransitionError(f"slot {self.sid} ({self.model}): {self.state.name} -> {to.name}")
        self.state = to

    @property
    def model(self) -> str:
        return self.spec.model.name

    @property
    def key(self) -> tuple[str, int, tuple[int, ...]]:
        """What a plan's replica is compared by: same key = keep this engine across a re-plan."""
        return (self.model, self.spec.tp, tuple(self.spec.devices))

    def describe(self) -> dict[str, Any]:
        out = {"slot": self.sid, "model": self.model, "tp": self.spec.tp,
               "devices": list(self.spec.devices)}
        if self.spec.threads > 1:
            out["threads"] = self.spec.threads
        out["pid"] = getattr(self.engine, "pid", None) if self.engine else None
        return out


class SlotHost(Protocol):
    """What a slot needs from the executor."""

    launcher: Launcher
    queues: ModelQueues
    clock: Clock
    dispatch_paused: bool  # results cannot be made durable: send nothing new until they can

    def slot_started(self, slot: Slot) -> None: ...
    def slot_start_failed(self, slot: Slot, message: str) -> None: ...
    def slot_died(self, slot: Slot, message: str) -> None: ...
    def request_dropped(self, slot: Slot, req: Req, message: str) -> None: ...
    # `reqs` were taken from the slot's in-flight and aborted to run `by` at once (`seats`)
    def requests_preempted(self, slot: Slot, reqs: list[Req], by: list[Req]) -> None: ...
    # the engine answered `req` with 200 just now; it was sent at `sent_s` (host.clock)
    def request_served(self, slot: Slot, req: Req, sent_s: float, body: dict[str, Any]) -> None: ...
    def check_drained(self, model: str) -> None: ...
    # how many requests `slot` may hold in flight now (`slots.EngineSlots.inflight_cap`)
    def inflight_cap(self, slot: Slot) -> int: ...
    # a batch's size as the seats compare batches (`seats`)
    def batch_size(self, batch_id: str) -> int: ...
    async def finish(self, req: Req, outcome: Outcome) -> None: ...


async def run_slot(slot: Slot, host: SlotHost) -> None:
    """Launch the engine, then dispatch until cancelled (by a stop) or the engine dies."""
    try:
        slot.engine = await host.launcher.launch(slot.spec)
    except asyncio.CancelledError:
        raise
    except NodeLost as exc:  # its node left the cluster: no fault of the model's, a re-plan moves it
        host.slot_died(slot, str(exc))
        return
    except Exception as exc:  # EngineError (bad path, OOM, timeout) or anything the launcher raised
        host.slot_start_failed(slot, str(exc) or type(exc).__name__)
        return
    slot.move(SlotState.RUNNING)
    host.slot_started(slot)
    await serve_slot(slot, host)


async def serve_slot(slot: Slot, host: SlotHost) -> None:
    """Dispatch on a running engine while watching its process (also after a wake-up)."""
    watcher = asyncio.create_task(_watch_exit(slot, host))
    try:
        await dispatch_loop(slot, host)
    finally:
        watcher.cancel()


async def dispatch_loop(slot: Slot, host: SlotHost) -> None:
    """Keep `slot.limit` requests in flight; past it, a request of a small batch still goes when
    much bigger ones' can be aborted for it, and then none of theirs goes while the small ones
    run (`seats`: the aborted are re-queued)."""
    while slot.state.serving:
        preempted: list[Req] = []
        by: list[Req] = []
        # a guest takes small batches' requests only (their `priority` is at most the seats')
        only = slot.inflight.small() if slot.state is SlotState.GUEST else None
        cap = host.inflight_cap(slot)
        while not host.dispatch_paused and not _held(slot, host) and (
                len(slot.inflight) < cap or _may_preempt(slot, host)):
            req = host.queues.pop(slot.model, slot.tail, at_most=only)
            if req is None:
                break
            req.dispatch()
            req.sent_s = None  # set when its task sends it
            slot.idle_since = None  # serving again (a warm engine's next batch): not idle
            req.task = slot.inflight[req] = asyncio.create_task(_run_request(slot, req, host))
            if _preempts(slot, host):
                victims = slot.inflight.victims(req.priority, req.batch_id, _sizes(slot, host))
                for victim in victims:
                    slot.inflight.pop(victim).cancel()
                if victims:
                    slot.inflight.hold(host.clock.monotonic())
                    preempted += victims
                    by.append(req)
        if preempted:
            host.requests_preempted(slot, preempted, by)
        host.check_drained(slot.model)
        if only is not None and not slot.inflight and not host.queues.has_queued(slot.model, only):
            return  # a guest whose small batches are done (it goes back to sleep)
        # no await between filling and clearing: a wake-up cannot be lost
        slot.wake.clear()
        held = slot.inflight.hold_left(host.clock.monotonic())
        if held is None:
            await slot.wake.wait()
        else:  # look again when the hold runs out, if no answer comes first
            await wait_event(host.clock, slot.wake, held)


def _preempts(slot: Slot, host: SlotHost) -> bool:
    """Whether the slot aborts running requests for small batches' (`seats`): with fair queues,
    on a generating engine (a pooling one gets no `priority`, nor is its admission ordered by it)."""
    return host.queues.fair and slot.spec.model.generates


def _may_preempt(slot: Slot, host: SlotHost) -> bool:
    """Whether the request its model's queue gives next would get in-flight ones aborted for it."""
    if not _preempts(slot, host):
        return False
    nxt = host.queues.next_priority(slot.model)
    return nxt is not None and bool(slot.inflight.victims(*nxt, _sizes(slot, host)))


def _held(slot: Slot, host: SlotHost) -> bool:
    """Whether the request its model's queue gives next is kept back while small batches run."""
    if not _preempts(slot, host) or slot.inflight.held_since is None:
        return False
    nxt = host.queues.next_priority(slot.model)
    return nxt is not None and slot.inflight.holds(
        nxt[1], _sizes(slot, host, in_flight=False), host.clock.monotonic())


def _sizes(slot: Slot, host: SlotHost, in_flight: bool = True) -> dict[str, int]:
    """The size (`SlotHost.batch_size`) of each batch with requests of the slot's model queued,
    and with `in_flight` of each with requests in flight on the slot (`seats`)."""
    batches = set(host.queues.priorities(slot.model))
    if in_flight:
        batches.update(r.batch_id for r in slot.inflight)
    return {b: host.batch_size(b) for b in batches}


async def _watch_exit(slot: Slot, host: SlotHost) -> None:
    assert slot.engine is not None
    code = await slot.engine.wait_exit()
    if slot.state.serving:  # an exit we did not ask for
        host.slot_died(slot, f"engine process exited with code {code}")


async def _run_request(slot: Slot, req: Req, host: SlotHost) -> None:
    assert slot.engine is not None
    try:
        # read back from the stored input file only now (see WorkItem), upstream outputs filled in
        payload = req.body()
        if req.item.url in GENERATING:  # its place in the engine's queue (`queues`); a copy
            payload = {**payload, "priority": req.priority}
    except (OSError, ValueError, KeyError, TypeError) as exc:  # input file gone or rewritten
        del slot.inflight[req]
        slot.wake.set()
        await host.finish(req, Outcome(
            custom_id=req.item.custom_id, line=req.item.line, model=req.item.model,
            status_code=None, attempts=req.attempts,
            error={"code": "input_unreadable", "message": f"the request's input line could not be "
                   f"read back: {type(exc).__name__}: {exc}"}))
        return
    sent_s = req.sent_s = host.clock.monotonic()
    try:
        status, body = await slot.engine.post(req.item.url, payload)
    except EngineDied as exc:
        if req in slot.inflight:
            host.slot_died(slot, str(exc))  # pops and re-queues (or fails) every in-flight request
        return
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a dropped connection: the engine is dying, or the connection broke
        if req not in slot.inflight:
            return
        if not await _engine_gone(slot.engine):
            if req in slot.inflight:  # the engine lives: the request itself never got an answer
                del slot.inflight[req]
                host.request_dropped(slot, req, f"{type(exc).__name__}: {exc}")
            return
        status, body = 502, {"error": {"code": "engine_error", "message": f"{type(exc).__name__}: {exc}"}}
    if req not in slot.inflight:
        return  # a stopper took it over
    if status >= 500 and await _engine_gone(slot.engine):
        if req in slot.inflight:
            host.slot_died(slot, f"engine exited after answering {status}: {body}")
        return
    if req not in slot.inflight:
        return
    del slot.inflight[req]
    slot.wake.set()  # room for one more
    if status == 200:
        host.request_served(slot, req, sent_s, body)
    await host.finish(req, make_outcome(req, status, body))


async def _engine_gone(engine: Engine) -> bool:
    """Whether a 5xx or a dropped connection means the engine died: a killed server drops its
    connections a moment before its process is reaped, and vLLM's server exits after its engine core
    died, so wait a little for the exit before calling it a per-request error."""
    if not engine.alive():
        return True
    try:
        await asyncio.wait_for(engine.wait_exit(), DEATH_GRACE_S)
    except asyncio.TimeoutError:
        return not engine.alive()
    return True


def make_outcome(req: Req, status: int, body: dict[str, Any]) -> Outcome:
    item = req.item
    rid = str(body.get("id", "")) if isinstance(body, dict) else ""
    if status == 200:
        return Outcome(custom_id=item.custom_id, line=item.line, model=item.model, status_code=200,
                       response_body=body, request_id=rid, attempts=req.attempts)
    # 4xx (and a 5xx from a live engine): a per-request error, never retried. vLLM's error body is
    # {"error": {"message", "type", "param", "code"}}; older servers return the fields at top level.
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = body if isinstance(body, dict) else {"message": str(body)}
    err = {"code": err.get("code") or str(status), "message": str(err.get("message", "")), **{
        k: v for k, v in err.items() if k not in ("code", "message")}}
    return Outcome(custom_id=item.custom_id, line=item.line, model=item.model, status_code=status,
                   error=err, request_id=rid, attempts=req.attempts, extra={"body": body})


# Sleep. On GPUs, vLLM's sleep mode level 1 (it offloads the weights to host memory and drops the
# KV cache, so the GPUs are free for another engine while this one waits to be needed again; waking
# is much faster than a reload). vLLM serves /sleep and /wake_up only when the engine runs with
# `--enable-sleep-mode` (a model's `engine_args = { enable_sleep_mode = true }`) and the environment
# has VLLM_SERVER_DEV_MODE=1. Enabled by `[devices] sleep_mode`; untested on this CPU machine. On
# CPU the engine is frozen (`Engine.freeze`, `[devices] cpu_sleep_gib`). Any failure answers False
# and the executor stops the engine instead.
async def sleep_engine(engine: Engine) -> bool:
    if engine.spec.device_kind == "cpu":
        return engine.freeze()
    try:
        status, _ = await engine.post("/sleep?level=1", {})
    except Exception as exc:  # an engine that cannot sleep is stopped instead
        log.warning("sleep failed for %r: %s", engine, exc)
        return False
    return status == 200


async def wake_engine(engine: Engine) -> bool:
    if engine.spec.device_kind == "cpu":
        return engine.thaw()
    try:
        status, _ = await engine.post("/wake_up", {})
    except Exception as exc:
        log.warning("wake_up failed for %r: %s", engine, exc)
        return False
    return status == 200 and engine.alive()
