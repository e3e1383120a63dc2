"""Which in-flight requests an engine runs (`runtime.executor.seats.InFlight`, vLLM's admission
emulated), and the preemption that lets a small batch's requests run at once on an engine whose
seats a big batch holds: the victim is re-queued, answered once, and `fifo` preempts nothing."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from pathlib import Path

from runtime.executor.executor import PoolExecutor
from runtime.executor.pool_state import Req
from runtime.executor.queues import ModelQueues
from runtime.executor.seats import PREEMPT_GAP, InFlight
from runtime.executor_api import WorkItem
from scheduler.types import DevicePool

from .fakes import FakeLauncher
from .test_executor import Sink, items, make_cfg

CHAT = "/v1/chat/completions"


def req(batch: str, n: int, priority: int) -> Req:
    r = Req(batch, WorkItem(n, f"{batch}-{n}", "m", CHAT, body={"model": "m"},
                            prompt_tokens=10, max_tokens=4))
    r.priority = priority
    return r


def test_the_first_seats_run_and_a_seat_left_goes_to_the_best_waiting_then_the_earliest() -> None:
    fl = InFlight(2)
    a, b, c, d, e = (req("x", i, p) for i, p in enumerate((5, 5, 5, 3, 3)))
    for r in (a, b, c, d, e):
        fl[r] = None  # type: ignore[assignment]
    assert list(fl.running) == [a, b]
    del fl[a]  # answered: d (priority 3, before e) is admitted, not c (dispatched earlier)
    assert list(fl.running) == [b, d]
    fl.pop(b)
    assert list(fl.running) == [d, e]
    fl.pop(c)  # a waiting one leaves: nobody is admitted
    assert list(fl.running) == [d, e] and len(fl) == 2
    fl.clear()
    assert fl.running == {} and len(fl) == 0


def test_the_victim_is_the_big_batchs_request_admitted_last() -> None:
    fl = InFlight(4)  # small: priority <= 3 (up to 7 left); big: 3 + PREEMPT_GAP now (17+ queued)
    big = [req("big", i, 10) for i in range(3)]
    mid = req("mid", 0, 2)
    for r in (big[0], mid, big[1], big[2]):
        assert fl.victim(2, "small", {"big": 6}) is None  # a seat is free
        fl[r] = None  # type: ignore[assignment]
    now = {"big": 3 + PREEMPT_GAP, "mid": 2}
    assert fl.victim(2, "small", now) is big[2]  # admitted last
    assert fl.victim(-1, "small", now) is big[2]  # a batch moved up for its deadline
    assert fl.victim(4, "small", now) is None  # more left than about twice the seats: not small
    assert fl.victim(2, "small", {**now, "big": 4}) is None  # drained: not big any more
    assert fl.victim(2, "small", {**now, "big": -1}) is None  # moved up for its deadline itself
    assert fl.victim(0, "mid", {"mid": 3, "big": 3 + PREEMPT_GAP}) is big[2]
    # a batch's own requests carry what it had left when each went, fewer and fewer: its later
    # ones never preempt its earlier ones
    assert fl.victim(2, "big", now) is None


def test_small_batches_arriving_together_preempt_only_the_big_one() -> None:
    """An engine saturated by a big batch, then five 20-request batches at once (what tiny-a's
    engine met when it came up in the fairness bench): dispatching as `dispatch_loop` does, every
    request aborted is the big batch's, and the small batches' requests all get seats."""
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
        if nxt is None or (len(fl) >= 48 and fl.victim(*nxt, q.priorities("m")) is None):
            break
        r = q.pop("m")
        r.dispatch()
        fl[r] = None  # type: ignore[assignment]
        victim = None if r in fl.running else fl.victim(r.priority, r.batch_id, q.priorities("m"))
        if victim is not None:
            fl.pop(victim)
            victim.requeue()
            q.push(victim, front=True)
            aborted.append(victim)
    assert aborted and {r.batch_id for r in aborted} == {"big"}
    small = [r for r in fl if r.batch_id != "big"]
    assert len(aborted) <= 32 and all(r in fl.running for r in small)


async def test_a_small_batch_runs_at_once_on_an_engine_a_big_batch_saturates(tmp_path: Path) -> None:
    """Four seats, 80 requests of a big batch running (0.16 s each), then 3 requests of a small
    one: three of the big batch's running requests are aborted for them and run again later;
    every request of both is answered exactly once, and the small batch is done before three of
    the big batch's requests are (it took no seat they left). With `fifo` nothing is preempted,
    and the small batch waits for seats."""
    for fairness, preempts in (("fair", True), ("fifo", False)):
        cfg = make_cfg(tmp_path / fairness, max_num_seqs=4)
        cfg = dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler,
                                                                     fairness=fairness))
        launcher = FakeLauncher(start_delay_s=0.02, step_s={"a": 0.02}, output_tokens=8)
        ex = PoolExecutor(cfg, launcher, pool=DevicePool("cpu", (0,), 1 << 28))
        await ex.start()
        try:
            big, small = Sink(), Sink()
            ex.submit("big", items("a", 80, prefix="big-"), big)
            while len(big.outcomes) < 12:  # the engine is up and saturated
                await asyncio.sleep(0.01)
            before = len(big.outcomes)
            ex.submit("small", items("a", 3, prefix="small-"), small)
            await asyncio.wait_for(ex.wait("small"), 30)
            meanwhile = len(big.outcomes) - before  # big requests answered while it ran
            await asyncio.wait_for(ex.wait("big"), 60)
        finally:
            await ex.close()
        assert Counter(o.custom_id for o in big.outcomes + small.outcomes).most_common(1)[0][1] == 1
        assert len(big.outcomes) == 80 and len(small.outcomes) == 3
        assert all(o.status_code == 200 for o in big.outcomes + small.outcomes)
        events = [e for e in ex.events("big") if e["event"] == "requests_preempted"]
        engine = launcher.engines[0]
        if preempts:
            assert sum(e["requeued"] for e in events) == 3 == engine.aborted
            assert events[0]["for_batches"] == ["small"] and events[0]["preempted_batches"] == ["big"]
            assert meanwhile < 3
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
