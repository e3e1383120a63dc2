"""The executor's state machine with the test-double launcher and the real planner.

Every test also checks, on teardown, that no device was ever given to two live engines and that no
engine is left running."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import pytest_asyncio

from runtime.config import Config, parse_config
from runtime.executor import outcome_store
from runtime.executor import passes as passes_mod
from runtime.executor.executor import PoolExecutor
from runtime.executor.slots import INFLIGHT_FACTOR
from gateway.lines import LineRef
from runtime.executor_api import Outcome, WorkItem
from runtime.persist import load_length_model
from scheduler.types import DevicePool, ExecPlan, Schedule, Stage

from .clocks import ManualClock
from .fakes import FakeLauncher

pytestmark = pytest.mark.timeout(60)

ARCHS = {
    "a": {"num_layers": 2, "hidden_size": 128, "num_heads": 2, "num_kv_heads": 1},
    "b": {"num_layers": 4, "hidden_size": 256, "num_heads": 4, "num_kv_heads": 2},
    "c": {"num_layers": 8, "hidden_size": 512, "num_heads": 8, "num_kv_heads": 2},
}
CHAT = "/v1/chat/completions"


def make_cfg(tmp_path: Path, *, max_num_seqs: int = 4, max_retries: int = 2,
             strategy: str = "samullm") -> Config:
    models = [{"name": name, "path": f"/nonexistent/{name}", "max_model_len": 1024,
               "max_num_seqs": max_num_seqs, "max_num_batched_tokens": 1024,
               "arch": {**arch, "intermediate_size": 4 * arch["hidden_size"], "vocab_size": 2048}}
              for name, arch in ARCHS.items()]
    # one max-length sequence needs ~20 GiB of KV: fits no engine of 0.25 GiB
    models.append({"name": "huge", "path": "/nonexistent/huge", "max_model_len": 32768,
                   "arch": {"num_layers": 80, "hidden_size": 8192, "num_heads": 64,
                            "num_kv_heads": 8, "intermediate_size": 28672, "vocab_size": 32000}})
    return parse_config({"server": {"state_dir": str(tmp_path / "state")},
                         "devices": {"kind": "cpu", "cpu_kvcache_gib": 0.25},
                         "limits": {"max_retries": max_retries},
                         "scheduler": {"strategy": strategy}, "models": models})


def items(model: str, n: int, prefix: str = "", start: int = 1, **body: Any) -> list[WorkItem]:
    out = []
    for i in range(n):
        b = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16,
             "custom_tag": f"{prefix}{model}-{i}", **body}
        out.append(WorkItem(line=start + i, custom_id=f"{prefix}{model}-{i}", model=model, url=CHAT,
                            body=b, prompt_tokens=20, max_tokens=16))
    return out


class Sink:
    """Records outcomes in delivery order; slow on purpose (a journal fsyncs)."""

    def __init__(self, log: list[tuple[str, Outcome]] | None = None, batch: str = "") -> None:
        self.outcomes: list[Outcome] = []
        self.log = log if log is not None else []
        self.batch = batch

    async def __call__(self, outcome: Outcome) -> None:
        await asyncio.sleep(0.001)
        self.outcomes.append(outcome)
        self.log.append((self.batch, outcome))

    def by_id(self) -> dict[str, Outcome]:
        counts = Counter(o.custom_id for o in self.outcomes)
        assert max(counts.values(), default=1) == 1, f"duplicate outcomes: {counts.most_common(3)}"
        return {o.custom_id: o for o in self.outcomes}


async def run_once(cfg: Config, launcher: FakeLauncher, pool: DevicePool, work: list[WorkItem],
                   planner: Any = None, batch: str = "b") -> PoolExecutor:
    """Start an executor, run one batch of `work` to the end, close it; returns it (its events stay)."""
    ex = PoolExecutor(cfg, launcher, pool=pool, **({"planner": planner} if planner else {}))
    await ex.start()
    try:
        ex.submit(batch, work, Sink())
        await asyncio.wait_for(ex.wait(batch), 30)
    finally:
        await ex.close()
    return ex


@pytest.fixture
def launcher() -> FakeLauncher:
    return FakeLauncher(delay_s={"a": 0.01, "b": 0.02, "c": 0.03})


@pytest_asyncio.fixture(loop_scope="function")
async def run(tmp_path: Path, launcher: FakeLauncher) -> AsyncIterator[Any]:
    made: list[PoolExecutor] = []

    async def factory(cfg: Config | None = None, devices: int = 4,
                      clock: ManualClock | None = None) -> PoolExecutor:
        cfg = cfg or make_cfg(tmp_path)
        pool = DevicePool("cpu", tuple(range(devices)), int(cfg.devices.cpu_kvcache_gib * 2**30))
        # the executor's own waits (arrival pause, storage backoff) take no real time
        ex = PoolExecutor(cfg, launcher, pool=pool, clock=clock or ManualClock(auto=True))
        await ex.start()
        made.append(ex)
        return ex

    yield factory
    for ex in made:
        await ex.close()
    assert launcher.overlaps == [], "a device was given to two live engines"
    assert launcher.alive() == [], "engines left running after close()"
    assert all(e.reaped for e in launcher.engines), "an engine's process group was never reaped"


def kinds(events: list[dict]) -> list[str]:
    return [e["event"] for e in events]


async def test_pooled_batches_complete_exactly_once(run, launcher: FakeLauncher) -> None:
    ex = await run()
    s1, s2 = Sink(), Sink()
    ex.submit("b1", items("a", 12) + items("b", 8), s1)
    ex.submit("b2", items("c", 6, prefix="x") + items("a", 5, prefix="x"), s2)
    await asyncio.wait_for(asyncio.gather(ex.wait("b1"), ex.wait("b2")), 30)
    got1, got2 = s1.by_id(), s2.by_id()
    assert set(got1) == {f"a-{i}" for i in range(12)} | {f"b-{i}" for i in range(8)}
    assert set(got2) == {f"xc-{i}" for i in range(6)} | {f"xa-{i}" for i in range(5)}
    assert all(o.ok and o.attempts >= 1 for o in s1.outcomes + s2.outcomes)
    assert all(o.response_body["model"] == o.model for o in s1.outcomes + s2.outcomes)
    ev = ex.events("b1")
    assert kinds(ev)[0] == "batch_submitted" and "plan" in kinds(ev) and "engine_started" in kinds(ev)
    # b2 joined the running pool: it sees the re-plan its submission caused
    replans = [e for e in ex.events("b2") if e["event"] in ("plan", "replan")]
    assert any("batch_submitted:b2" in e["reasons"] for e in replans)
    assert all(e["strategy"] == "samullm" for e in replans)


async def test_replan_when_first_model_finishes(run, launcher: FakeLauncher) -> None:
    launcher.delay_s["c"] = 0.3  # c still runs when a is done, even on a busy machine
    ex = await run()
    sink = Sink()
    ex.submit("b", items("a", 3) + items("c", 30), sink)
    await asyncio.wait_for(ex.wait("b"), 30)
    ev = ex.events("b")
    finished = [e["model"] for e in ev if e["event"] == "model_finished"]
    assert finished[0] == "a" and "c" in finished, [{k: v for k, v in e.items() if k != "time"} for e in ev]
    first = kinds(ev).index("model_finished")
    later = [e for e in ev[first:] if e["event"] == "replan"]
    assert later and "model_finished:a" in later[0]["reasons"]
    assert later[0]["remaining"].get("a") is None  # the finished model is not planned again
    assert len(sink.by_id()) == 33


async def test_inflight_per_engine_is_bounded_and_full(run, launcher: FakeLauncher) -> None:
    launcher.delay_s["a"] = 0.05
    ex = await run(devices=1)
    ex.submit("b", items("a", 40), sink := Sink())
    await asyncio.wait_for(ex.wait("b"), 30)
    limit = math.ceil(INFLIGHT_FACTOR * 4)
    assert len(sink.by_id()) == 40
    assert max(e.max_inflight for e in launcher.engines) == limit


async def test_engine_killed_mid_run_requeues_and_completes(run, launcher: FakeLauncher) -> None:
    launcher.delay_s["a"] = 0.05
    ex = await run(devices=2)
    ex.submit("b", items("a", 40), sink := Sink())
    while len(sink.outcomes) < 5:
        await asyncio.sleep(0.01)
    victims = launcher.alive("a")
    victims[0].kill()
    await asyncio.wait_for(ex.wait("b"), 30)
    got = sink.by_id()
    assert len(got) == 40 and all(o.ok for o in got.values())
    assert any(o.attempts == 2 for o in got.values())  # re-run after the death
    ev = ex.events("b")
    failed = [e for e in ev if e["event"] == "engine_failed"]
    assert failed and failed[0]["pid"] == victims[0].pid and failed[0]["requeued"] > 0
    assert any(e["event"] == "replan" and any(r.startswith("engine_failed") for r in e["reasons"])
               for e in ev)


async def test_retries_are_bounded_then_engine_failed(run, launcher: FakeLauncher, tmp_path) -> None:
    launcher.die_on_post["b"] = True
    ex = await run(make_cfg(tmp_path, max_retries=1), devices=2)
    ex.submit("x", items("a", 6) + items("b", 8), sink := Sink())
    await asyncio.wait_for(ex.wait("x"), 30)
    got = sink.by_id()
    assert len(got) == 14
    assert all(got[f"a-{i}"].ok for i in range(6))
    for i in range(8):
        o = got[f"b-{i}"]
        assert o.error["code"] == "engine_failed" and o.status_code is None
        assert o.attempts == 2  # the first run + max_retries=1
    assert len(launcher.engines) >= 3  # restarted, then gave up


async def test_start_failure_fails_that_model_only(run, launcher: FakeLauncher) -> None:
    launcher.fail_start.add("b")
    ex = await run()
    ex.submit("x", items("a", 6) + items("b", 5), sink := Sink())
    await asyncio.wait_for(ex.wait("x"), 30)
    got = sink.by_id()
    assert all(got[f"a-{i}"].ok for i in range(6))
    for i in range(5):
        err = got[f"b-{i}"].error
        assert err["code"] == "engine_start_failed" and "out of memory" in err["message"]
    assert "engine_start_failed" in kinds(ex.events("x"))


async def test_a_model_that_fits_nowhere_fails_alone(run, launcher: FakeLauncher) -> None:
    ex = await run()
    ex.submit("x", items("a", 4) + items("huge", 2), sink := Sink())
    await asyncio.wait_for(ex.wait("x"), 30)
    got = sink.by_id()
    assert all(got[f"a-{i}"].ok for i in range(4))
    assert {got[f"huge-{i}"].error["code"] for i in range(2)} == {"planning_failed"}
    failed = [e for e in ex.events("x") if e["event"] == "plan_failed"]
    assert failed and failed[0]["models"] == ["huge"]
    assert not any(e.spec.model.name == "huge" for e in launcher.engines)


async def test_client_errors_are_per_request_and_not_retried(run, launcher: FakeLauncher) -> None:
    ex = await run()
    bad = [WorkItem(line=99, custom_id="bad", model="a", url=CHAT,
                    body={"model": "a", "prompt": "no messages", "custom_tag": "bad"},
                    prompt_tokens=3, max_tokens=16)]
    ex.submit("x", items("a", 4) + bad + items("nope", 1), sink := Sink())
    await asyncio.wait_for(ex.wait("x"), 30)
    got = sink.by_id()
    assert got["bad"].status_code == 400 and got["bad"].error["code"] == 400
    assert "messages" in got["bad"].error["message"] and got["bad"].response_body is None
    assert [p for p in launcher.posts if p[1] == "bad"] == [("a", "bad")]  # sent once
    assert got["nope-0"].error["code"] == "model_not_found"
    assert all(got[f"a-{i}"].ok for i in range(4))


async def test_server_errors_wait_for_the_process_to_tell_death(run, launcher, monkeypatch) -> None:
    monkeypatch.setattr("runtime.executor.dispatch.DEATH_GRACE_S", 0.3)
    ex = await run(devices=1)
    ex.submit("x", items("a", 3) + items("a", 1, prefix="e", fail_with=500), sink := Sink())
    await asyncio.wait_for(ex.wait("x"), 30)
    got = sink.by_id()
    assert got["ea-0"].status_code == 500 and got["ea-0"].attempts == 1  # engine lived: not retried
    assert "engine_failed" not in kinds(ex.events("x"))
    ex.submit("y", items("a", 1, prefix="d", fail_with="drop"), sink2 := Sink())
    await asyncio.wait_for(ex.wait("y"), 30)
    # the connection dropped and the process exited: a death, re-queued until retries ran out
    assert sink2.by_id()["da-0"].error["code"] == "engine_failed"
    assert sink2.outcomes[0].attempts == 3 and "engine_failed" in kinds(ex.events("y"))


async def test_a_dropped_connection_to_a_live_engine_is_retried(run, launcher, monkeypatch) -> None:
    monkeypatch.setattr("runtime.executor.dispatch.DEATH_GRACE_S", 0.2)
    ex = await run(devices=1)
    ex.submit("x", items("a", 2) + items("a", 1, prefix="o", fail_with="drop_live_once")
              + items("a", 1, prefix="l", fail_with="drop_live"), sink := Sink())
    await asyncio.wait_for(ex.wait("x"), 30)
    got = sink.by_id()
    assert got["oa-0"].ok and got["oa-0"].attempts == 2  # re-sent once, answered
    # a connection that keeps breaking is bounded like an engine death (max_retries = 2)
    assert got["la-0"].error["code"] == "engine_error" and got["la-0"].attempts == 3
    assert "broke 3 times" in got["la-0"].error["message"]
    assert "engine_failed" not in kinds(ex.events("x"))  # the engine lived throughout
    assert len(launcher.engines) == 1


async def test_a_stream_of_new_batches_is_planned_in_few_passes(run, launcher) -> None:
    """Arrivals alone wait for ARRIVAL_PASS_INTERVAL_S after the last pass and share one pass (the
    executor's clock moves only when told: nothing is planned for them before it does)."""
    launcher.delay_s["a"] = 0.05
    clock = ManualClock()
    ex = await run(devices=1, clock=clock)
    ex.submit("first", items("a", 300), Sink())  # ~2.5 s of work: in the pool throughout
    while not launcher.posts:
        await asyncio.sleep(0.005)
    sinks = []
    for i in range(20):  # 8 requests: not small on 4 seats (a small one gets no pass at all)
        ex.submit(f"s{i}", items("a", 8, prefix=f"s{i}"), sink := Sink())
        sinks.append(sink)
    await asyncio.sleep(0.1)

    def plans() -> list[dict]:
        return [e for e in ex.events("first") if e["event"] in ("plan", "replan")]
    assert len(plans()) == 1 and clock.sleeping == 1  # the control task waits out the pause
    await clock.advance(passes_mod.ARRIVAL_PASS_INTERVAL_S)
    while len(plans()) < 2:
        await asyncio.sleep(0.005)
    assert sorted(plans()[1]["reasons"]) == sorted(f"batch_submitted:s{i}" for i in range(20))
    await asyncio.wait_for(asyncio.gather(*(ex.wait(f"s{i}") for i in range(20))), 30)
    assert all(len(s.outcomes) == 8 and all(o.ok for o in s.outcomes) for s in sinks)
    await ex.wait("first")
    assert len(plans()) == 2


async def test_a_small_batch_served_at_once_gets_no_pass_of_its_own(run, launcher) -> None:
    """A small batch of a model whose engine is up is served without a plan (the seats' hold);
    a pass for it only took the CPU it was served on (the fairness bench's s6, 5 Dec 2026). Its
    pass waits while it is served, and is dropped once it is done (the plan is as it was)."""
    launcher.delay_s["a"] = 0.05
    clock = ManualClock()
    ex = await run(devices=1, clock=clock)
    ex.submit("first", items("a", 300), Sink())  # in the pool throughout
    while not launcher.posts:
        await asyncio.sleep(0.005)
    ex.submit("small", items("a", 2, prefix="s"), sink := Sink())
    await asyncio.wait_for(ex.wait("small"), 10)  # served, the manual clock still
    assert len(sink.outcomes) == 2 and all(o.ok for o in sink.outcomes)
    await clock.advance(passes_mod.ARRIVAL_PASS_INTERVAL_S + passes_mod.SMALL_ARRIVAL_WAIT_S)
    await asyncio.sleep(0.1)
    plans = [e for e in ex.events("first") if e["event"] in ("plan", "replan")]
    assert len(plans) == 1, [p["reasons"] for p in plans]


async def test_a_small_batch_still_served_after_the_wait_is_planned(run, launcher) -> None:
    """The wait for a small batch served at once is bounded: one still running after
    SMALL_ARRIVAL_WAIT_S gets its pass; so does one whose model has no engine up."""
    launcher.delay_s.update(a=3.0, b=0.01)  # real seconds: the advances below take about 1 s
    clock = ManualClock()
    ex = await run(devices=1, clock=clock)
    ex.submit("first", items("a", 300), Sink())
    while not launcher.posts:
        await asyncio.sleep(0.005)

    def reasons() -> list[list[str]]:
        return [e["reasons"] for e in ex.events("first") if e["event"] in ("plan", "replan")]
    ex.submit("small", items("a", 2, prefix="s"), Sink())
    await asyncio.sleep(0.02)
    await clock.advance(passes_mod.ARRIVAL_PASS_INTERVAL_S)
    assert len(reasons()) == 1  # waiting while it is served
    await clock.advance(passes_mod.SMALL_ARRIVAL_WAIT_S)
    while len(reasons()) < 2:
        await asyncio.sleep(0.005)
    assert reasons()[1] == ["batch_submitted:small"] and not ex._batches["small"].finished.is_set()
    ex.submit("other", items("b", 2, prefix="o"), Sink())  # b: no engine up, the pass plans one
    await asyncio.sleep(0.02)
    await clock.advance(passes_mod.ARRIVAL_PASS_INTERVAL_S)
    while len(reasons()) < 3:
        await asyncio.sleep(0.005)
    assert reasons()[2] == ["batch_submitted:other"]


async def test_a_batch_after_an_idle_spell_is_planned_at_once(run, launcher) -> None:
    """The arrival pause spares a busy gateway back-to-back passes; with nothing in flight there is
    nothing to spare, and a batch sent right after the last one completed is planned at once (the
    bench sent batch 2 0.1 s after batch 1 ended: its plan came 0.9 s later, its ETA was late)."""
    clock = ManualClock()
    ex = await run(devices=1, clock=clock)
    ex.submit("first", items("a", 3), Sink())
    await asyncio.wait_for(ex.wait("first"), 10)
    await asyncio.sleep(0.3)  # the pass after the pool finished has run (the manual clock is still)
    ex.submit("second", items("b", 3), sink := Sink())  # b has no engine: it needs a pass
    await asyncio.wait_for(ex.wait("second"), 10)  # the manual clock never moved
    assert len(sink.outcomes) == 3


async def test_cancel_mid_run_aborts_and_frees_every_engine(run, launcher: FakeLauncher) -> None:
    launcher.delay_s.update(a=0.2, b=0.2)
    ex = await run()
    ex.submit("x", items("a", 60) + items("b", 60), sink := Sink())
    other = Sink()
    while len(sink.outcomes) < 3:
        await asyncio.sleep(0.01)
    await asyncio.wait_for(ex.cancel("x"), 10)
    n = len(sink.outcomes)
    assert n < 120
    assert launcher.alive() == []  # nothing else had work: every engine stopped
    await asyncio.wait_for(ex.wait("x"), 1)
    await asyncio.sleep(0.3)
    assert len(sink.outcomes) == n  # nothing reported after cancel returned
    sink.by_id()
    assert "batch_cancelled" in kinds(ex.events("x"))
    # the executor keeps serving after a cancel
    ex.submit("y", items("a", 3, prefix="y"), other)
    await asyncio.wait_for(ex.wait("y"), 30)
    assert len(other.by_id()) == 3


async def test_cancel_keeps_other_batches_running(run, launcher: FakeLauncher) -> None:
    launcher.delay_s.update(a=0.05)
    ex = await run()
    ex.submit("x", items("a", 30), sx := Sink())
    ex.submit("y", items("a", 10, prefix="y"), sy := Sink())
    while not sx.outcomes:
        await asyncio.sleep(0.01)
    await ex.cancel("x")
    await asyncio.wait_for(ex.wait("y"), 30)
    assert len(sy.by_id()) == 10 and all(o.ok for o in sy.outcomes)


async def test_strategies_are_never_pooled(run, launcher: FakeLauncher) -> None:
    ex = await run()
    order: list[tuple[str, Outcome]] = []
    ex.submit("seq", items("a", 8) + items("b", 4), Sink(order, "seq"), strategy="sequential")
    ex.submit("even", items("a", 5, prefix="e"), Sink(order, "even"), strategy="even-split")
    ex.submit("seq2", items("c", 3, prefix="s"), Sink(order, "seq2"), strategy="sequential")
    await asyncio.wait_for(asyncio.gather(*(ex.wait(b) for b in ("seq", "even", "seq2"))), 30)
    batches = [b for b, _ in order]
    # FIFO by submission: the even-split pool runs after the first sequential pool, and the later
    # sequential batch does not overtake it
    assert batches.index("even") > max(i for i, b in enumerate(batches) if b == "seq")
    assert batches.index("seq2") > max(i for i, b in enumerate(batches) if b == "even")
    plans = [e for e in ex.events("even") if e["event"] in ("plan", "replan")]
    assert plans and all(e["strategy"] == "even-split" for e in plans)
    assert plans[0]["remaining"] == {"a": 5}


async def test_lengths_are_learned_and_persisted(run, launcher: FakeLauncher, tmp_path) -> None:
    cfg = make_cfg(tmp_path)
    ex = await run(cfg)
    ex.submit("x", items("a", 10), Sink())
    await asyncio.wait_for(ex.wait("x"), 30)
    await ex.close()
    lm = load_length_model(cfg.state_dir)
    dist = lm.distribution("a", CHAT)
    assert dist.num_observations == 10  # 8 tokens, natural endings (cap 16)
    saved = json.loads((cfg.state_dir / "lengths.json").read_text())
    assert saved["distributions"][0]["model"] == "a"


async def test_empty_batch_and_close_mid_run(run, launcher: FakeLauncher) -> None:
    launcher.delay_s["a"] = 0.5
    ex = await run()
    ex.submit("empty", [], Sink())
    await asyncio.wait_for(ex.wait("empty"), 1)
    ex.submit("x", items("a", 20), Sink())
    while not launcher.alive("a") or not any(e.inflight for e in launcher.alive("a")):
        await asyncio.sleep(0.01)
    await asyncio.wait_for(ex.close(), 10)
    assert launcher.alive() == []
    with pytest.raises(RuntimeError):
        ex.submit("late", items("a", 1), Sink())


async def test_close_during_a_replan_stop_leaves_no_engine(run, launcher: FakeLauncher) -> None:
    launcher.stop_delay_s = 0.3
    launcher.delay_s["c"] = 0.2
    ex = await run()
    ex.submit("x", items("a", 2) + items("c", 40), Sink())
    while "engine_stop" not in kinds(ex.events("x")):
        await asyncio.sleep(0.005)
    await asyncio.wait_for(ex.close(), 10)  # interrupts the pass that is stopping a's engine
    assert launcher.alive() == [] and all(e.reaped for e in launcher.engines)


async def test_close_while_a_pass_waits_for_a_dead_engine_reap(run, launcher: FakeLauncher) -> None:
    launcher.stop_delay_s = 0.5
    launcher.delay_s["a"] = 0.1
    ex = await run(devices=2)
    ex.submit("x", items("a", 40), sink := Sink())
    while not sink.outcomes:
        await asyncio.sleep(0.005)
    launcher.alive("a")[0].kill()  # reaped in the background; the re-plan pass waits for it
    while "replan" not in kinds(ex.events("x")):
        await asyncio.sleep(0.005)
    await asyncio.wait_for(ex.close(), 10)
    assert launcher.alive() == [] and all(e.reaped for e in launcher.engines)


async def test_gpu_sleep_mode_sleeps_a_preempted_engine_and_wakes_it(tmp_path, launcher) -> None:
    """The slot lifecycle alone (no control loop): stage 1 runs a on GPU 0; stage 2 runs b on GPU 1
    while a still has work, so a's engine sleeps (GPU 0 is not needed); stage 3 wants a on GPU 0
    again: the same engine wakes instead of a reload."""
    cfg = dataclasses.replace(make_cfg(tmp_path), devices=dataclasses.replace(
        make_cfg(tmp_path).devices, sleep_mode=True))
    ex = PoolExecutor(cfg, launcher, pool=DevicePool("h100", (0, 1), 80 * 2**30))
    a, b = ExecPlan("a", 1, 1, (0,)), ExecPlan("b", 1, 1, (1,))
    try:
        await ex.slots.apply(Stage([a], 0, 1), {"a", "b"})
        while not launcher.alive("a"):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        await ex.slots.apply(Stage([b], 0, 1), {"a", "b"})
        engine_a = launcher.engines[0]
        assert engine_a.alive() and engine_a.asleep
        await ex.slots.apply(Stage([a], 0, 1), {"a"})
        assert engine_a.alive() and not engine_a.asleep
        assert [e.spec.model.name for e in launcher.engines] == ["a", "b"]  # no reload of a
        assert ("a", "/sleep?level=1") in launcher.posts and ("a", "/wake_up") in launcher.posts
    finally:
        await ex.close()
    assert launcher.alive() == [] and all(e.reaped for e in launcher.engines)


async def test_close_lets_outcomes_being_delivered_finish(run, launcher: FakeLauncher) -> None:
    started, completed = [], []

    async def slow_sink(outcome: Outcome) -> None:
        started.append(outcome.custom_id)
        await asyncio.sleep(0.3)  # a journal append + fsync, slowed down
        completed.append(outcome.custom_id)

    ex = await run()
    ex.submit("x", items("a", 3), slow_sink)
    while not started:
        await asyncio.sleep(0.005)
    await asyncio.wait_for(ex.close(), 10)
    assert completed and sorted(completed) == sorted(started)


async def test_replan_that_changes_a_plan_preempts_and_reruns(run, launcher, tmp_path) -> None:
    """A scripted planner (the executor's reaction to a changed plan is what is tested here): the
    first plan runs a on core 0 with TP=1, every later one a on cores 0-1 with TP=2. The TP=1
    engine is stopped, its in-flight requests go back to the queue and run on the new engine."""
    calls: list[str] = []

    def scripted(problem, strategy):
        calls.append(strategy)
        plan = ExecPlan("a", 1, 1, (0,)) if len(calls) == 1 else ExecPlan("a", 2, 1, (0, 1))
        return Schedule(strategy, [Stage([plan], 0.0, 1.0)], 1.0)

    launcher.delay_s["a"] = 0.2
    cfg = make_cfg(tmp_path)
    ex = PoolExecutor(cfg, launcher, planner=scripted, clock=ManualClock(auto=True),
                      pool=DevicePool("cpu", (0, 1), int(0.25 * 2**30)))  # y's arrival re-plans now
    await ex.start()
    try:
        ex.submit("x", items("a", 10), sx := Sink())
        while not any(e.inflight for e in launcher.alive("a")):
            await asyncio.sleep(0.005)
        ex.submit("y", items("a", 2, prefix="y"), sy := Sink())  # an event: re-plan
        await asyncio.wait_for(asyncio.gather(ex.wait("x"), ex.wait("y")), 30)
    finally:
        await ex.close()
    got = sx.by_id()
    assert len(got) == 10 and len(sy.by_id()) == 2 and all(o.ok for o in got.values())
    stop = next(e for e in ex.events("x") if e["event"] == "engine_stop")
    assert stop["tp"] == 1 and stop["why"] == "re-plan" and stop["requeued"] >= 1
    assert sum(o.attempts == 2 for o in got.values()) == stop["requeued"]  # re-run once each
    assert [(e.spec.tp, e.spec.devices) for e in launcher.engines] == [(1, (0,)), (2, (0, 1))]


async def test_bodies_are_read_from_the_input_file_when_sent(run, tmp_path) -> None:
    """Items that refer to their input line (as validation makes them) carry no body until sent;
    a line that cannot be read back fails alone with `input_unreadable`."""
    path, data, refs = tmp_path / "in.jsonl", b"", []
    for i in range(3):
        line = json.dumps({"custom_id": f"f-{i}", "method": "POST", "url": CHAT,
                           "body": items("a", 1, prefix=f"f{i}")[0].body}).encode()
        refs.append(LineRef(str(path), len(data), len(line)))
        data += line + b"\n"
    path.write_bytes(data)
    lazy = [WorkItem(i + 1, f"f-{i}", "a", CHAT, None, 20, 16, ref) for i, ref in enumerate(refs)]
    gone = WorkItem(9, "gone", "a", CHAT, None, 20, 16, LineRef(str(tmp_path / "none"), 0, 9))
    ex = await run()
    ex.submit("x", lazy + [gone], sink := Sink())
    await asyncio.wait_for(ex.wait("x"), 30)
    got = sink.by_id()
    assert all(got[f"f-{i}"].ok for i in range(3))
    assert got["gone"].status_code is None and got["gone"].error["code"] == "input_unreadable"


class FullDiskSink(Sink):
    """A journal on a disk that is full until `free()`: every append raises ENOSPC."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False
        self.refused = 0

    async def __call__(self, outcome: Outcome) -> None:
        if self.full:
            self.refused += 1
            raise OSError(28, "No space left on device")
        await super().__call__(outcome)


async def test_a_result_that_cannot_be_made_durable_pauses_the_batch(run, launcher) -> None:
    """Issue 12, item 1: a sink that raises (ENOSPC) does not count the request; dispatch pauses
    while results cannot be stored and resumes when space returns; each custom_id exactly once."""
    launcher.delay_s.update(a=0.02)
    clock = ManualClock()
    ex = await run(clock=clock)
    ex.submit("x", items("a", 80), sink := FullDiskSink())
    while len(sink.outcomes) < 5:
        await asyncio.sleep(0.005)
    sink.full = True
    while sink.refused == 0:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.2)  # what the engines held is answered; nothing new is sent meanwhile
    sent, refused = len(launcher.posts), sink.refused
    await clock.advance(outcome_store.STORE_RETRY_S[0] * 0.9)
    assert sink.refused == refused, "retried before its backoff"
    await clock.advance(30.0)  # backoff 0.1, 0.2, ... 2 s: about 20 attempts per stalled outcome
    assert sink.refused > refused, "never retried"
    assert len(launcher.posts) == sent, "requests were dispatched while results could not be stored"
    assert not ex._batches["x"].finished.is_set()
    sink.full = False
    await clock.advance(outcome_store.STORE_RETRY_S[1])
    await asyncio.wait_for(ex.wait("x"), 30)
    got = sink.by_id()
    assert set(got) == {f"a-{i}" for i in range(80)} and all(o.ok for o in got.values())
    ev = kinds(ex.events("x"))
    assert "storage_stalled" in ev and "storage_resumed" in ev


async def test_cancel_and_close_do_not_wait_for_a_full_disk(run, launcher) -> None:
    launcher.delay_s.update(a=0.02)
    ex = await run()
    ex.submit("x", items("a", 40), sink := FullDiskSink())
    ex.submit("y", items("a", 40, prefix="y"), sink_y := FullDiskSink())
    while len(sink.outcomes) < 3:
        await asyncio.sleep(0.005)
    sink.full = sink_y.full = True
    while sink.refused == 0:
        await asyncio.sleep(0.005)
    await asyncio.wait_for(ex.cancel("x"), 5)  # its undurable outcomes are dropped, not awaited
    await asyncio.wait_for(ex.close(), 10)  # y's are given up too: they re-run after a restart


async def test_each_request_carries_its_batchs_priority_to_the_engine(run, launcher) -> None:
    """Sent bodies carry `priority` (what the request's batch has left, open on every model, to
    a power of two: `queues`), and the stored body is not touched (a re-send computes it again)."""
    ex = await run(devices=1)
    big, small = items("a", 30), items("a", 2, prefix="s")
    ex.submit("big", big, Sink())
    ex.submit("small", small, Sink())
    await asyncio.wait_for(asyncio.gather(ex.wait("big"), ex.wait("small")), 30)
    sent = {b["custom_tag"]: b["priority"] for b in launcher.bodies}
    assert (sent["sa-0"], sent["sa-1"], sent["a-0"]) == (2 .bit_length(),) * 2 + (30 .bit_length(),)
    assert all("priority" not in it.body for it in big + small)
