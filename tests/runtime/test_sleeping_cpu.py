"""CPU engines sleep frozen (`slots.EngineSlots`, `Engine.freeze`): an engine whose cores a stage
takes is frozen instead of stopped while `[devices] cpu_sleep_gib` allows, woken instead of started
when a later stage wants it back, thawed as a guest beside the stage's engines for a small batch
of its model, and stopped when its model has had no work for `engine_linger_s`.

Test-double engines (`fakes.FakeLauncher(freezable=True)`); the fixture checks that no request
went to a frozen engine and no device went to two engines that were not frozen."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from runtime.config import parse_config
from runtime.executor.passes import SMALL_ARRIVAL_WAIT_S

from .clocks import ManualClock
from .executor_kit import ARCHS, Sink, items, kinds
from .test_warm_engines import idle

pytestmark = pytest.mark.timeout(60)


def cfg_with(tmp_path: Path, **devices) -> object:
    models = [{"name": name, "path": f"/nonexistent/{name}", "max_model_len": 1024,
               "max_num_seqs": 4, "max_num_batched_tokens": 1024,
               "arch": {**arch, "intermediate_size": 4 * arch["hidden_size"], "vocab_size": 2048}}
              for name, arch in ARCHS.items()]
    return parse_config({"server": {"state_dir": str(tmp_path / "state")},
                         "devices": {"kind": "cpu", "cpu_kvcache_gib": 0.25, **devices},
                         "models": models})


async def until(cond, what: str) -> None:
    for _ in range(500):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


def engines(launcher, model: str) -> list:
    return [e for e in launcher.engines if e.spec.model.name == model]


async def a_frozen_for_b(run, launcher, tmp_path: Path, **devices) -> tuple:
    """One core: a's engine ran a batch, then b's batch took the core; returns (executor, clock)."""
    launcher.freezable = True
    clock = ManualClock()
    ex = await run(cfg=cfg_with(tmp_path, **devices), devices=1, clock=clock)
    ex.submit("first", items("a", 5), Sink())
    await asyncio.wait_for(ex.wait("first"), 30)
    await idle(ex)
    ex.submit("other", items("b", 3, prefix="o"), other := Sink())
    await clock.advance(2)  # past the arrival pause
    await asyncio.wait_for(ex.wait("other"), 30)
    assert len(other.by_id()) == 3
    return ex, clock


async def test_an_engine_whose_core_a_stage_takes_sleeps_and_is_woken_not_started(
        run, launcher, tmp_path) -> None:
    ex, clock = await a_frozen_for_b(run, launcher, tmp_path)
    [a] = engines(launcher, "a")
    assert a.alive() and a.frozen  # asleep, not stopped
    assert "engine_sleep" in kinds(ex.events("other"))
    assert [s["model"] for s in ex.health()["sleeping_engines"]] == ["a"]
    await idle(ex)  # b is done and kept warm
    # a big batch of a (more than twice the seats): the stage wants a back on the core
    ex.submit("again", items("a", 12, prefix="g"), again := Sink())
    await clock.advance(2)
    await asyncio.wait_for(ex.wait("again"), 30)
    assert len(again.by_id()) == 12
    assert engines(launcher, "a") == [a] and not a.frozen  # woken: no second start
    assert "engine_wake" in kinds(ex.events("again"))
    assert "engine_start" not in kinds(ex.events("again"))
    [b] = engines(launcher, "b")
    assert b.alive() and b.frozen  # b in turn gave the core up asleep


async def test_a_small_batch_wakes_its_models_engine_as_a_guest_beside_the_stage(
        run, launcher, tmp_path) -> None:
    ex, clock = await a_frozen_for_b(run, launcher, tmp_path)
    [a] = engines(launcher, "a")
    launcher.delay_s["b"] = 0.05
    ex.submit("big", items("b", 200, prefix="big"), big := Sink())  # b keeps the core busy
    await clock.advance(2)
    await until(lambda: len(big.outcomes) >= 4, "the big batch did not start")
    ex.submit("small", items("a", 3, prefix="s"), small := Sink())
    await asyncio.wait_for(ex.wait("small"), 10)
    assert not engines(launcher, "b")[0].frozen  # the stage's engine served on beside the guest
    assert len(small.by_id()) == 3 and all(o.ok for o in small.outcomes)
    assert not ex._batches["big"].finished.is_set()  # served before the big batch ended
    assert engines(launcher, "a") == [a]  # the frozen engine served it: no start
    assert len(engines(launcher, "b")) == 1 and engines(launcher, "b")[0].alive()  # b kept on
    await until(lambda: a.frozen, "the guest was not frozen again after its small batch")
    assert "engine_guest" in kinds(ex.events("small"))
    # a's drain is no reason to re-plan: no engine of a is in the plan (a pass for it at each
    # guest's end, 0.15-0.5 s of planning, in the fairness bench of 5 Dec 2026)
    assert "model_finished" in kinds(ex.events("small"))
    await clock.advance(2)  # past the arrival pause
    await asyncio.sleep(0.2)
    assert "model_finished:a" not in [r for e in ex.events("big") if e["event"] == "replan"
                                      for r in e["reasons"]]
    await asyncio.wait_for(ex.wait("big"), 30)
    assert len(big.by_id()) == 200


@pytest.mark.parametrize("work", [
    lambda: items("a", 12, prefix="x"),  # not small: the plan decides
    # small means the batch as a whole: 3 requests on a of a 40-request batch are the plan's
    lambda: items("a", 3, prefix="p") + items("b", 37, prefix="pb")], ids=["big", "pooled-share"])
async def test_a_batch_not_small_as_a_whole_gets_no_guest(run, launcher, tmp_path, work) -> None:
    ex, clock = await a_frozen_for_b(run, launcher, tmp_path)
    [a] = engines(launcher, "a")
    launcher.delay_s["b"] = 0.05
    ex.submit("big", items("b", 200, prefix="big"), Sink())
    await clock.advance(2)
    ex.submit("other", work(), Sink())
    await asyncio.sleep(0.2)
    assert a.frozen or "engine_wake" in kinds(ex.events("other"))
    assert "engine_guest" not in kinds(ex.events("other"))


async def test_no_memory_to_sleep_stops_the_engine(run, launcher, tmp_path) -> None:
    launcher.memory_bytes = 2**30
    ex, _ = await a_frozen_for_b(run, launcher, tmp_path, cpu_sleep_gib=0.5)
    [a] = engines(launcher, "a")
    assert not a.alive() and a.reaped and launcher.freezes == []
    assert "engine_stop" in kinds(ex.events("other"))


async def test_a_sleeping_engine_whose_model_has_no_work_stops_after_the_linger_time(
        run, launcher, tmp_path) -> None:
    ex, clock = await a_frozen_for_b(run, launcher, tmp_path)
    [a] = engines(launcher, "a")
    assert a.frozen
    await clock.advance(ex.cfg.devices.engine_linger_s - 5)
    assert a.alive()
    await clock.advance(10)
    await until(lambda: not a.alive(), "the sleeping engine outlived its linger time")
    assert a.reaped and ex.health()["sleeping_engines"] == []


async def test_engines_that_cannot_freeze_are_stopped(run, launcher, tmp_path) -> None:
    launcher.freezable = False  # e.g. an engine on a Ray node
    clock = ManualClock()
    ex = await run(cfg=cfg_with(tmp_path), devices=1, clock=clock)
    ex.submit("first", items("a", 5), Sink())
    await asyncio.wait_for(ex.wait("first"), 30)
    await idle(ex)
    ex.submit("other", items("b", 3, prefix="o"), Sink())
    await clock.advance(2)
    await asyncio.wait_for(ex.wait("other"), 30)
    assert launcher.alive("a") == [] and launcher.freezes == []


def test_metrics_count_the_sleeping_engines() -> None:
    from gateway.metrics import GatewayMetrics
    gm = GatewayMetrics()
    gm.bind(lambda: {}, lambda: 0, lambda: 0)
    gm.bind_sleeping(lambda: 3)
    assert b"samullm_sleeping_engines 3.0" in gm.render()


def _slot(cfg, sid: int, model: str, cores: tuple[int, ...], state) -> "Slot":
    from runtime.engines.engine import EngineSpec
    from runtime.executor.dispatch import Slot
    mc = cfg.model(model)
    slot = Slot(sid, EngineSpec(model=mc, model_path=Path("."), devices=cores), limit=6)
    slot.state = state
    return slot


class _Owner:
    clock = ManualClock()


def test_a_guest_serves_where_no_small_batch_is_and_the_plan_has_most_slack(tmp_path) -> None:
    from runtime.executor.dispatch import SlotState
    from runtime.executor.slots import EngineSlots
    from scheduler.types import DevicePool
    cfg = cfg_with(tmp_path)
    slots = EngineSlots(cfg, owner=_Owner(), state_dir=tmp_path)  # type: ignore[arg-type]
    slots.pool = DevicePool("cpu", (0, 1, 2), 2**30)
    now = _Owner.clock.monotonic()
    guest = _slot(cfg, 1, "a", (0,), SlotState.SLEEPING)
    on0 = _slot(cfg, 2, "b", (0,), SlotState.RUNNING)
    on1 = _slot(cfg, 3, "c", (1,), SlotState.RUNNING)
    on2 = _slot(cfg, 4, "a", (2,), SlotState.STARTING)
    slots.all = [guest, on0, on1, on2]
    slots.finish_at = {"b": now + 30, "c": now + 10, "a": now + 20}
    assert slots.guests.cores(guest) == (1,)  # c ends first: the most slack
    on1.inflight.hold(now)  # c's engine now serves a small batch
    assert slots.guests.cores(guest) == (2,)
    on2.state = SlotState.GUEST
    on2.guest_cores = (2,)
    assert slots.guests.cores(guest) == (0,)  # one small batch everywhere: b, at home
    on1.inflight.held_since, on2.state = None, SlotState.RUNNING
    on0.idle_since = now  # b's engine has no work left: done now
    slots.finish_at = {"c": now + 10, "a": now + 20}
    assert slots.guests.cores(guest) == (0,)
    wide = _slot(cfg, 5, "a", (0, 1), SlotState.SLEEPING)
    assert slots.guests.cores(wide) == (0, 1)  # a rank on several cores stays on its own


class _SlotsOwner:
    """What `EngineSlots` asks of its executor, for tests of the slots alone."""

    def __init__(self) -> None:
        from runtime.executor.queues import ModelQueues
        self.clock = ManualClock()
        self.queues = ModelQueues("fair")
        self.events: list[str] = []

    def push(self, req, front=False):
        self.queues.push(req, front)

    def emit(self, kind, **data):
        self.events.append(kind)

    def batch_open(self, batch_id):
        return 1

    def requests_aborted(self, slot, reqs):
        pass


def _one_running_engine(tmp_path: Path) -> tuple:
    """Slots on two cores with one engine of model a running on core 0, freezable; returns
    (owner, slots, its slot)."""
    from runtime.executor.dispatch import SlotState
    from runtime.executor.slots import EngineSlots
    from scheduler.types import DevicePool
    from .fakes import FakeEngine, FakeLauncher

    cfg = cfg_with(tmp_path)
    owner = _SlotsOwner()
    slots = EngineSlots(cfg, owner=owner, state_dir=tmp_path)  # type: ignore[arg-type]
    slots.pool = DevicePool("cpu", (0, 1), 2**30)
    slot = _slot(cfg, 1, "a", (0,), SlotState.RUNNING)
    slot.engine = FakeEngine(slot.spec, FakeLauncher(freezable=True), 7)
    slots.all = [slot]
    return owner, slots, slot


async def test_an_engine_being_put_to_sleep_is_woken_as_a_guest_only_once_frozen(
        tmp_path, monkeypatch) -> None:
    """Its sleep awaits the engine's memory reading with the slot already SLEEPING: a small batch
    queued then must not wake it as a guest, or it is frozen under the guest's request (the
    makespan bench's even-split batch hung so, 5 Dec). Once frozen, the sleep looks again: the
    small batch's requests it had in flight were re-queued while it went to sleep, and nothing
    queued later would wake it (the fairness bench's s5 waited 14.9 s so, 5 Dec 23:05)."""
    from runtime.executor.dispatch import SlotState
    from runtime.executor.pool_state import Req

    owner, slots, slot = _one_running_engine(tmp_path)
    served = []

    async def serve(slot):  # the guest's dispatch loop needs the whole executor: not here
        served.append(slot.sid)
    monkeypatch.setattr(slots.guests, "_serve_guest", serve)
    owner.queues.push(Req("small", items("a", 1, prefix="s")[0]))
    asyncio.get_running_loop().call_soon(slots.guests.visit, "a")  # runs while the sleep awaits
    await slots._sleep(slot, {"a"}, 0.0)
    await asyncio.sleep(0)
    # frozen first (engine_sleep), then woken as a guest for the small batch, and serving
    assert owner.events[-2:] == ["engine_sleep", "engine_guest"], owner.events
    assert slot.state is SlotState.GUEST and not slot.engine.frozen and served == [1]


async def test_engines_put_to_sleep_together_stay_within_the_budget(run, launcher, tmp_path) -> None:
    """Two engines put to sleep by one stage: each checked the budget before the other's memory
    was read, so both slept over it (found 5 Dec 2026); now the second one to be read stops."""
    launcher.freezable, launcher.memory_bytes = True, 2**30
    clock = ManualClock()
    ex = await run(cfg=cfg_with(tmp_path, cpu_sleep_gib=1.5), devices=2, clock=clock)
    ex.submit("first", items("a", 3) + items("b", 3, prefix="b"), Sink())
    await clock.advance(2)
    await asyncio.wait_for(ex.wait("first"), 30)
    assert sorted(s["model"] for s in ex.health()["idle_engines"]) == ["a", "b"]  # one core each
    ex.submit("big", items("c", 40, prefix="c"), big := Sink())  # c wants both cores
    await clock.advance(2)
    await asyncio.wait_for(ex.wait("big"), 30)
    assert len(big.by_id()) == 40
    frozen = [e for e in launcher.engines if e.alive() and e.frozen]
    assert len(frozen) == 1, [(e.spec.model.name, e.alive(), e.frozen) for e in launcher.engines]


async def test_a_small_batch_a_guest_serves_is_left_out_of_the_plan(launcher, tmp_path) -> None:
    """The re-plan on a small batch's arrival plans without the requests its model's guest serves:
    planned, they made a stage that put the big batch's running engine to sleep for them (its 48
    requests in flight aborted, their progress lost; the fairness bench's big batch 1.14× its
    alone time, 5 Dec 2026 15:50), where the guest beside it was serving them already."""
    from runtime.executor.executor import PoolExecutor
    from scheduler.planner import plan
    from scheduler.types import DevicePool
    problems = []

    def recording(problem, strategy):
        problems.append(problem)
        return plan(problem, strategy)

    launcher.freezable = True
    clock = ManualClock()
    ex = PoolExecutor(cfg_with(tmp_path), launcher, planner=recording, clock=clock,
                      pool=DevicePool("cpu", (0,), 2**28))
    await ex.start()
    try:
        ex.submit("first", items("a", 5), Sink())
        await asyncio.wait_for(ex.wait("first"), 30)
        await idle(ex)
        launcher.delay_s["b"] = 0.05
        ex.submit("big", items("b", 200, prefix="big"), big := Sink())  # b takes the core
        await clock.advance(2)
        await until(lambda: len(big.outcomes) >= 4, "the big batch did not start")
        [a] = engines(launcher, "a")
        assert a.frozen
        before = len(problems)
        launcher.delay_s["a"] = 1.0  # real seconds: still served when its pass runs
        ex.submit("small", items("a", 3, prefix="s"), small := Sink())
        await until(lambda: "engine_guest" in kinds(ex.events("small")), "no guest")
        # past the arrival pause and the wait for a small batch served at once: the re-plan
        await clock.advance(2 + SMALL_ARRIVAL_WAIT_S)
        await until(lambda: len(problems) > before, "no re-plan on the small batch's arrival")
        # every plan since the guest woke: without a (the guest's), b kept (never put to sleep)
        assert all("a" not in p.work for p in problems[before:]), [sorted(p.work) for p in problems]
        assert "engine_sleep" not in [e["event"] for e in ex.events("big")
                                      if e.get("model") == "b"]
        await asyncio.wait_for(ex.wait("small"), 10)
        assert len(small.by_id()) == 3
        assert not engines(launcher, "b")[0].frozen
        await asyncio.wait_for(ex.wait("big"), 30)
    finally:
        await ex.close()


async def test_an_engine_a_stage_replaces_is_not_woken_as_a_guest_for_its_own_models_work(
        tmp_path, monkeypatch) -> None:
    """A stage that moves model a from one core to an engine on both puts a's engine to sleep
    first; the batch it served, down to fewer requests than twice the seats, counts as small. It
    must not wake that engine as a guest beside the new one: on the cores the new engine starts
    on, it served the batch's last 63 requests while the new engine sat idle (`bench/fresh.py`,
    6 Dec 2026: 21.5 s for them, the batch 34.3 s against 21 s predicted)."""
    from runtime.executor.dispatch import SlotState
    from runtime.executor.pool_state import Req
    from scheduler.types import ExecPlan, Stage

    owner, slots, slot = _one_running_engine(tmp_path)
    started = []
    monkeypatch.setattr(slots, "start", started.append)
    owner.queues.push(Req("tail", items("a", 1, prefix="t")[0]))  # small by now
    stage = Stage([ExecPlan("a", 1, 1, (0, 1), threads=2)], 0.0, 10.0)
    await slots.apply(stage, {"a"}, 0.0)
    await asyncio.sleep(0)
    assert started == [("a", 1, (0, 1))]
    assert slot.state is SlotState.SLEEPING and slot.engine.frozen
    assert "engine_guest" not in owner.events, owner.events
    # a stage without a: a small batch of a wakes it as a guest again
    monkeypatch.setattr(slots.guests, "_serve_guest", lambda s: asyncio.sleep(0))
    await slots.apply(None, {"a"}, 0.0)
    slots.guests.visit("a")
    assert owner.events[-1] == "engine_guest" and slot.state is SlotState.GUEST
