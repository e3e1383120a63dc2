"""DP replicas of a model share its queue evenly (`slots.EngineSlots.inflight_cap`): each holds at
most an even share of its model's work in flight, as the planner splits it
(`scheduler.dag.split_replicas`), so the first replica up does not take a short queue whole."""

from __future__ import annotations

import asyncio

import pytest

from .executor_kit import Sink, items, make_cfg

pytestmark = pytest.mark.timeout(60)


async def test_two_replicas_split_a_short_queue_evenly(run, launcher, tmp_path) -> None:
    # 8 seats: each replica may hold 12 in flight; the queue has 12 requests in all
    ex = await run(cfg=make_cfg(tmp_path, max_num_seqs=8, strategy="sequential"), devices=2)
    launcher.delay_s["a"] = 0.3  # every request still in flight when the second replica is up
    ex.submit("b", items("a", 12), sink := Sink())
    await asyncio.wait_for(ex.wait("b"), 30)
    assert len(sink.by_id()) == 12
    replicas = [e for e in launcher.engines if e.spec.model.name == "a"]
    assert len(replicas) == 2, [e.spec.devices for e in replicas]
    assert sorted(e.served for e in replicas) == [6, 6]


async def test_a_replica_takes_more_once_its_share_is_done(run, launcher, tmp_path) -> None:
    """The share is of what is left: a replica that finished its part takes from the queue again
    while the other still works (nothing waits for a slow or starting replica)."""
    ex = await run(cfg=make_cfg(tmp_path, max_num_seqs=2, strategy="sequential"), devices=2)
    ex.submit("b", items("a", 40), sink := Sink())
    await asyncio.wait_for(ex.wait("b"), 30)
    replicas = [e for e in launcher.engines if e.spec.model.name == "a"]
    assert len(sink.by_id()) == 40 and len(replicas) == 2
    assert all(e.max_inflight <= 3 for e in replicas)  # its limit (1.5 × 2 seats), never above
    assert min(e.served for e in replicas) >= 10


async def test_a_replica_added_to_a_running_one_takes_what_waits_in_the_old_engine(
        launcher, tmp_path) -> None:
    """A plan grown by a replica (`scheduler.growth`): the running replica holds 1.5 × its seats in
    flight, the requests past its seats waiting in its engine's queue. Once the new replica is up
    they move to it (aborted before they began, re-queued), so the two split the work as the
    planner does; before, the old replica kept them and the new one got only the queue's rest
    (`bench.fresh` 5 Dec 2026: medium's second replica served 15 of 63 requests)."""
    from runtime.executor.executor import PoolExecutor
    from scheduler.types import DevicePool, ExecPlan, Schedule, Stage
    from .clocks import ManualClock
    calls: list[str] = []

    def grown(problem, strategy):  # first a on core 0, then a second replica on core 1
        calls.append(strategy)
        plan = ExecPlan("a", 1, 1, (0,)) if len(calls) == 1 else ExecPlan("a", 1, 2, (0, 1))
        return Schedule(strategy, [Stage([plan], 0.0, 1.0)], 1.0)

    launcher.delay_s["a"] = 0.4
    launcher.start_delay_s = 0.2
    ex = PoolExecutor(make_cfg(tmp_path, max_num_seqs=4), launcher, planner=grown,
                      clock=ManualClock(auto=True), pool=DevicePool("cpu", (0, 1), 2**28))
    await ex.start()
    try:
        ex.submit("x", items("a", 6), sx := Sink())  # 6 in flight: 4 seats, 2 waiting
        while not any(e.inflight == 6 for e in launcher.alive("a")):
            await asyncio.sleep(0.005)
        ex.submit("y", items("a", 2, prefix="y"), sy := Sink())  # an event: re-plan, grown
        await asyncio.wait_for(asyncio.gather(ex.wait("x"), ex.wait("y")), 30)
    finally:
        await ex.close()
    got = sx.by_id()
    assert len(got) == 6 and len(sy.by_id()) == 2 and all(o.ok for o in got.values())
    [moved] = [e for e in ex.events("x") if e["event"] == "requests_moved"]
    assert moved["requests"] == 2 and moved["to"] == [1]  # the two past the old engine's seats
    assert sum(o.attempts == 2 for o in got.values()) == 2  # each sent again once
    old, new = [e for e in launcher.engines if e.spec.model.name == "a"]
    assert old.served == 4 and new.served == 4  # its 4 seats' requests; the moved 2 and y's 2
