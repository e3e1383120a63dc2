"""The executor's state machine with the test-double launcher and the real planner.

Every test also checks, on teardown, that no device was ever given to two live engines and that no
engine is left running (the `run` fixture, `conftest.py`). When a pass is planned is tested in
`test_passes.py`, and outcomes that cannot be stored in `test_outcome_store.py`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math

import pytest

from gateway.lines import LineRef
from runtime.executor.executor import PoolExecutor
from runtime.executor.slots import INFLIGHT_FACTOR
from runtime.executor_api import Outcome, WorkItem
from runtime.persist import load_length_model
from scheduler.types import DevicePool, ExecPlan, Schedule, Stage

from .clocks import ManualClock
from .executor_kit import CHAT, Sink, items, kinds, make_cfg
from .fakes import FakeLauncher

pytestmark = pytest.mark.timeout(60)


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
