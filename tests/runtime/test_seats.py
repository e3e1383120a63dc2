"""Which in-flight requests an engine runs (`runtime.executor.seats.InFlight`, vLLM's admission
emulated), and the preemption that gives a small batch an engine a big batch saturates: the big
batch's requests in flight there are re-queued and answered once, none of its requests is sent
while the small batch runs (within what the hold leaves unused: `HOLD_MAX_S`), and `fifo` preempts
nothing."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from pathlib import Path

import pytest

from runtime.executor.executor import PoolExecutor
from runtime.executor.pool_state import Req
from runtime.executor.queues import ModelQueues
from runtime.executor.seats import HOLD_CAP_S, HOLD_MAX_S, PREEMPT_GAP, InFlight
from runtime.executor_api import WorkItem
from scheduler.types import DevicePool

from .fakes import FakeLauncher
from .executor_kit import Sink, items, make_cfg

CHAT = "/v1/chat/completions"


def req(batch: str, n: int, priority: int) -> Req:
    r = Req(batch, WorkItem(n, f"{batch}-{n}", "m", CHAT, body={"model": "m"},
                            prompt_tokens=10, max_tokens=4))
    r.priority = priority
    return r


def test_a_small_batchs_request_aborts_every_request_the_big_batches_have_in_flight() -> None:
    fl = InFlight(4)  # small: priority <= 3 (up to 7 left); big: 3 + PREEMPT_GAP now (17+ queued)
    big = [req("big", i, 10) for i in range(5)]
    mid = req("mid", 0, 2)
    for r in (big[0], mid, big[1], big[2], big[3], big[4]):
        fl[r] = None  # type: ignore[assignment]
    now = {"big": 3 + PREEMPT_GAP, "mid": 2}
    # four seats: those running (some of big 0-2) and those waiting in the engine alike, each
    # would share the small batch's steps or take a seat it leaves
    assert fl.victims(2, "small", now) == big
    assert fl.victims(-1, "small", now) == big  # a batch moved up for its deadline
    assert fl.victims(4, "small", now) == []  # more left than about twice the seats: not small
    assert fl.victims(2, "small", {**now, "big": 4}) == []  # drained: not big any more
    assert fl.victims(2, "small", {**now, "big": -1}) == []  # moved up for its deadline itself
    assert fl.victims(0, "mid", {"mid": 3, "big": 3 + PREEMPT_GAP}) == big
    # a batch's own requests carry what it had left when each went, fewer and fewer: its later
    # ones never preempt its earlier ones
    assert fl.victims(2, "big", now) == []


def test_the_engine_is_held_for_the_small_batch_until_it_is_done_or_the_hold_ends() -> None:
    fl = InFlight(4)
    small = [req("small", i, 2) for i in range(2)]
    now = {"big": 3 + PREEMPT_GAP}
    assert not fl.holds("big", now, 0.0)  # no hold yet
    for r in small:
        fl[r] = None  # type: ignore[assignment]
    fl.hold(10.0)
    assert fl.holds("big", now, 10.5)
    assert not fl.holds("mid", {**now, "mid": 3}, 10.5)  # not big: shares the engine
    assert not fl.holds("big", {**now, "other": 1}, 10.5)  # a small batch still queued: the
    # fair queues' aging chose the big one over it, and the hold does not undo that
    del fl[small[0]]
    assert fl.holds("big", now, 10.6)
    # a long small batch: bounded by the seats it leaves unused (0.5 of them until 10.5, then
    # 0.75 counted from 10.5: the one left alone)
    end = 10.5 + (HOLD_MAX_S - 0.25) / 0.75
    assert fl.holds("big", now, end - 0.01) and fl.hold_left(end - 0.01) == pytest.approx(0.01)
    assert not fl.holds("big", now, end + 0.01)
    fl.hold(20.0)
    del fl[small[1]]
    assert not fl.holds("big", now, 20.1)  # the small batch is done
    assert fl.hold_left(20.1) is None


def test_a_small_batch_that_fills_most_seats_is_held_longer_than_one_that_leaves_them_empty(
        ) -> None:
    """The hold is bounded by what it leaves unused: HOLD_MAX_S of all the seats. A bound of
    HOLD_MAX_S in time ended the hold for a 20-request batch on a `medium` engine of 32 seats
    that had just started: its last decode steps then ran beside the big batch's prefill (3.3 s
    against 0.8 s alone, 6 Dec 2026)."""
    fl = InFlight(32)
    now = {"big": 6 + PREEMPT_GAP}
    for r in [req("small", i, 5) for i in range(20)]:
        fl[r] = None  # type: ignore[assignment]
    fl.hold(0.0)
    end = HOLD_MAX_S / (12 / 32)  # 12 of 32 seats empty: 5.3 s
    assert fl.holds("big", now, HOLD_MAX_S + 1.0) and fl.holds("big", now, end - 0.01)
    assert not fl.holds("big", now, end + 0.01)
    # every seat taken by small batches: nothing unused, held up to HOLD_CAP_S
    full = InFlight(4)
    for r in [req("small", i, 2) for i in range(4)]:
        full[r] = None  # type: ignore[assignment]
    full.hold(0.0)
    assert full.holds("big", {"big": 3 + PREEMPT_GAP}, HOLD_CAP_S - 0.01)
    assert full.hold_left(HOLD_CAP_S - 1.0) == pytest.approx(1.0)
    assert not full.holds("big", {"big": 3 + PREEMPT_GAP}, HOLD_CAP_S + 0.01)


def test_small_batches_arriving_together_preempt_only_the_big_one() -> None:
    """An engine saturated by a big batch, then five 20-request batches at once (what tiny-a's
    engine met when it came up in the fairness bench): dispatching as `dispatch_loop` does, every
    request aborted is the big batch's, the small batches' requests all get seats, and no big
    request goes while they run."""
    q, fl = ModelQueues(), InFlight(32)
    for n in range(900):
        q.push(req("big", n, 0))
    while len(fl) < 48:
        r = q.pop("m")
        r.dispatch()
        fl[r] = None  # type: ignore[assignment]
    for b in range(5):
        for n in range(20):
            q.push(req(f"s{b}", n, 0))
    aborted = []
    while True:
        nxt = q.next_priority("m")
        if nxt is None or fl.holds(nxt[1], q.priorities("m"), 1.0) or (
                len(fl) >= 48 and not fl.victims(*nxt, q.priorities("m"))):
            break
        r = q.pop("m")
        r.dispatch()
        fl[r] = None  # type: ignore[assignment]
        for victim in fl.victims(r.priority, r.batch_id, q.priorities("m")):
            fl.pop(victim)
            victim.requeue()
            q.push(victim, front=True)
            aborted.append(victim)
            fl.hold(1.0)
    assert len(aborted) == 48 and {r.batch_id for r in aborted} == {"big"}
    small = [r for r in fl if r.batch_id != "big"]
    assert len(small) == len(fl) == 48  # the small batches' first 48, and no big one


class Posts(list):
    """A fake launcher's posts as (tag, the small batch's requests answered when it was sent)."""

    def __init__(self, launcher: FakeLauncher) -> None:
        super().__init__()
        self.launcher = launcher

    def append(self, item) -> None:
        _, tag = item
        done = sum(str(b.get("custom_tag", "")).startswith("small-") for b in self.launcher.bodies)
        super().append((tag, done))


async def behind_a_big_one(tmp_path: Path, small: list[WorkItem], big: list[WorkItem],
                           fairness: str = "fair", output_tokens: int = 8):
    """Four seats, `big` running on one engine (0.02 s per token, at most `output_tokens`) until
    12 are answered, then `small`, both to the end: (executor, launcher with `Posts`, big sink,
    small sink, big requests answered while the small batch ran)."""
    cfg = make_cfg(tmp_path, max_num_seqs=4)
    cfg = dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler, fairness=fairness))
    launcher = FakeLauncher(start_delay_s=0.02, step_s={"a": 0.02}, output_tokens=output_tokens)
    launcher.posts = Posts(launcher)
    ex = PoolExecutor(cfg, launcher, pool=DevicePool("cpu", (0,), 1 << 28))
    await ex.start()
    try:
        big_sink, small_sink = Sink(), Sink()
        ex.submit("big", big, big_sink)
        while len(big_sink.outcomes) < 12:  # the engine is up and saturated
            await asyncio.sleep(0.01)
        before = len(big_sink.outcomes)
        ex.submit("small", small, small_sink)
        await asyncio.wait_for(ex.wait("small"), 30)
        meanwhile = len(big_sink.outcomes) - before
        await asyncio.wait_for(ex.wait("big"), 60)
    finally:
        await ex.close()
    return ex, launcher, big_sink, small_sink, meanwhile


def first_small(launcher: FakeLauncher) -> int:
    return next(i for i, (tag, _) in enumerate(launcher.posts) if tag.startswith("small-"))


async def test_a_small_batch_runs_at_once_on_an_engine_a_big_batch_saturates(tmp_path: Path) -> None:
    """Four seats, 80 requests of a big batch running (0.16 s each), then 3 requests of a small
    one: the big batch's six requests in flight (four running, two waiting in the engine) are
    aborted and run again later, and none of its requests is sent until the small batch is done;
    every request of both is answered exactly once. With `fifo` nothing is preempted, and the
    small batch waits for seats."""
    for fairness, preempts in (("fair", True), ("fifo", False)):
        ex, launcher, big, small, meanwhile = await behind_a_big_one(
            tmp_path / fairness, items("a", 3, prefix="small-"), items("a", 80, prefix="big-"),
            fairness)
        assert Counter(o.custom_id for o in big.outcomes + small.outcomes).most_common(1)[0][1] == 1
        assert len(big.outcomes) == 80 and len(small.outcomes) == 3
        assert all(o.status_code == 200 for o in big.outcomes + small.outcomes)
        events = [e for e in ex.events("big") if e["event"] == "requests_preempted"]
        engine = launcher.engines[0]
        if preempts:
            assert sum(e["requeued"] for e in events) == 6 == engine.aborted
            assert events[0]["for_batches"] == ["small"] and events[0]["preempted_batches"] == ["big"]
            assert meanwhile == 0
            # held: the three small ones, then big ones again only once all three were answered
            after = launcher.posts[first_small(launcher):]
            assert [tag[:6] for tag, _ in after[:3]] == ["small-"] * 3
            assert all(done == 3 for tag, done in after[3:]), after[:8]
        else:
            assert events == [] and engine.aborted == 0
            assert meanwhile >= 3


def test_metrics_count_the_preempted_requests_per_model() -> None:
    from gateway.metrics import GatewayMetrics
    gm = GatewayMetrics()
    assert b'samullm_requests_preempted_total{model="a"}' not in gm.render()
    for n in (3, 2):
        gm.observe_event(["big", "small"], {"event": "requests_preempted", "model": "a",
                                            "requeued": n})
    gm.observe_event(["big"], {"event": "plan"})
    assert b'samullm_requests_preempted_total{model="a"} 5.0' in gm.render()


async def test_the_hold_for_a_small_batch_of_long_answers_ends_after_its_bound(
        tmp_path: Path, monkeypatch) -> None:
    """One small request of a long answer (1.3 s) must not keep an engine of four seats on one
    sequence: once the hold's bound passed, the big batch's requests are sent again while it
    runs, and every request is answered once."""
    monkeypatch.setattr("runtime.executor.seats.HOLD_MAX_S", 0.2)
    _, launcher, big, small, _ = await behind_a_big_one(
        tmp_path, items("a", 1, prefix="small-", max_tokens=64),
        items("a", 80, prefix="big-", max_tokens=8), output_tokens=64)
    assert len(big.by_id()) == 80 and len(small.by_id()) == 1
    during = [tag for tag, done in launcher.posts[first_small(launcher) + 1:] if done == 0]
    assert during and all(t.startswith("big-") for t in during)


async def test_a_big_batch_whose_share_of_a_model_drained_is_still_preempted(tmp_path) -> None:
    """A batch is big or small as a whole: a 210-request batch with only 10 requests of model
    `a` (6 in flight, 4 queued: a small queue there) is still preempted on `a`'s engine by a
    3-request batch. Judged by its queue of `a` alone it was not, and the small batch waited
    for its seats: the fairness bench's s7 on `medium`, whose share of the big batch had drained
    while the batch still had hundreds open on `small` (6.1 s against 1.6 s alone, 5 Dec 2026)."""
    cfg = make_cfg(tmp_path, max_num_seqs=4)
    launcher = FakeLauncher(start_delay_s=0.02, step_s={"a": 0.05, "b": 0.01}, output_tokens=8)
    launcher.posts = Posts(launcher)
    ex = PoolExecutor(cfg, launcher, pool=DevicePool("cpu", (0, 1), 1 << 28))
    await ex.start()
    try:
        big, small = Sink(), Sink()
        ex.submit("big", items("a", 10, prefix="big-") + items("b", 200, prefix="big-"), big)
        while not any(s.model == "a" and len(s.inflight) == s.limit for s in ex.slots):
            await asyncio.sleep(0.01)
        held = next(len(s.inflight) for s in ex.slots if s.model == "a")
        ex.submit("small", items("a", 3, prefix="small-"), small)
        await asyncio.wait_for(ex.wait("small"), 30)
        await asyncio.wait_for(ex.wait("big"), 60)
    finally:
        await ex.close()
    assert len(big.by_id()) == 210 and len(small.by_id()) == 3
    events = [e for e in ex.events("small") if e["event"] == "requests_preempted"]
    assert events and events[0]["preempted_batches"] == ["big"]
    # every one it had in flight there (the seats and some waiting), and those the queue's
    # fair pick sent between the small batch's requests
    assert sum(e["requeued"] for e in events) >= held > 4
    # the aborted requests' work is no answer's (they went before any answer here): a's
    # answers are not replayed as a fresh engine's whole run, which would read that work as a
    # slower engine; they are a run whose first requests queued behind it (`ServedLog.interrupt`)
    (a,) = [w for k, w in ex.learned.served.snapshot().items() if k[0] == "a"]
    assert a.runs and all(r.trimmed or r.end_s is not None for r in a.runs)
