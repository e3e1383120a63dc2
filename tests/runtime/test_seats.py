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


def test_the_victim_is_the_last_admitted_of_a_much_bigger_batch() -> None:
    fl = InFlight(64)  # a batch with up to 127 left may preempt (priority <= 64's bit length, 7)
    big = [req("big", i, 10) for i in range(63)]
    mid = req("mid", 0, 5 + PREEMPT_GAP - 1)
    for r in (*big[:62], mid, big[62]):
        assert fl.victim(5, "small") is None  # a seat is free
        fl[r] = None  # type: ignore[assignment]
    assert fl.victim(5, "small") is big[62]  # admitted last of the batches PREEMPT_GAP bigger
    assert fl.victim(9, "small") is None  # more left than the engine seats
    assert fl.victim(-1, "small") is big[62]  # a batch moved up for its deadline
    # a batch's own requests carry what it had left when each went, fewer and fewer: its later
    # ones never preempt its earlier ones
    assert fl.victim(5, "big") is None
    for r in big:
        fl.pop(r)
    assert fl.victim(5, "small") is None  # a seat is free
    for i in range(63):
        fl[req("other", i, 5 + PREEMPT_GAP - 1)] = None  # type: ignore[assignment]
    assert fl.victim(5, "small") is None  # a batch not PREEMPT_GAP bigger: not worth it


def test_a_batch_draining_alone_preempts_nothing_of_its_own() -> None:
    fl = InFlight(4)
    for i, left in enumerate(range(200, 0, -1)):  # one batch, dispatched as seats free
        r = req("big", i, left.bit_length())
        fl[r] = None  # type: ignore[assignment]
        assert r in fl.running or fl.victim(r.priority, r.batch_id) is None
        if len(fl) > 6:
            del fl[next(iter(fl.running))]


async def test_a_small_batch_runs_at_once_on_an_engine_a_big_batch_saturates(tmp_path: Path) -> None:
    """Four seats, 80 requests of a big batch running (0.16 s each), then 3 requests of a small
    one: three of the big batch's running requests are aborted for them and run again later;
    every request of both is answered exactly once, and the small batch is done in about one
    request's time. With `fifo` nothing is preempted."""
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
            t0 = asyncio.get_running_loop().time()
            ex.submit("small", items("a", 3, prefix="small-"), small)
            await asyncio.wait_for(ex.wait("small"), 30)
            took = asyncio.get_running_loop().time() - t0
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
            assert events[0]["batch"] == "small" and events[0]["preempted_batches"] == ["big"]
            assert took < 0.3  # one request's 0.16 s, not the wait for three seats
        else:
            assert events == [] and engine.aborted == 0
