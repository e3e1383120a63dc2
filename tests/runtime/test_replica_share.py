"""DP replicas of a model share its queue evenly (`slots.EngineSlots.inflight_cap`): each holds at
most an even share of its model's work in flight, as the planner splits it
(`scheduler.dag.split_replicas`), so the first replica up does not take a short queue whole."""

from __future__ import annotations

import asyncio

import pytest

from .test_executor import Sink, items, launcher, make_cfg, run  # noqa: F401  (fixtures)

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
