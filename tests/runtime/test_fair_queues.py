"""Whose request a model's engines take next (`runtime.executor.queues.ModelQueues`): batches take
turns (a small batch that arrives behind a big one is done within about twice its own dispatches),
none starves, a batch that left and comes back has no credit, and `fifo` keeps arrival order."""

from __future__ import annotations

import pytest

from runtime.executor.pool_state import Req
from runtime.executor.queues import ModelQueues
from runtime.executor_api import WorkItem

CHAT = "/v1/chat/completions"


def req(batch: str, n: int, model: str = "m") -> Req:
    return Req(batch, WorkItem(n, f"{batch}-{n}", model, CHAT, body={"model": model},
                               prompt_tokens=10, max_tokens=4))


def fill(q: ModelQueues, batch: str, count: int, model: str = "m") -> None:
    for n in range(count):
        q.push(req(batch, n, model))


def drain(q: ModelQueues, k: int, model: str = "m") -> list[str]:
    return [r.batch_id for r in (q.pop(model) for _ in range(k)) if r is not None]


def test_a_small_batch_behind_a_big_one_is_done_within_twice_its_size() -> None:
    q = ModelQueues()
    fill(q, "big", 800)
    assert drain(q, 300) == ["big"] * 300  # the big batch alone: it is served
    fill(q, "small", 5)
    got = drain(q, 10)
    assert got == ["big", "small"] * 5  # turns, from the level it joined at
    assert drain(q, 1000).count("big") == 495  # nothing lost


def test_fifo_keeps_arrival_order() -> None:
    q = ModelQueues("fifo")
    fill(q, "big", 20)
    fill(q, "small", 3)
    assert drain(q, 23) == ["big"] * 20 + ["small"] * 3


def test_no_batch_starves_under_a_stream_of_new_ones() -> None:
    q = ModelQueues()
    fill(q, "big", 1000)
    served = 0
    for k in range(50):  # a new 4-request batch before every 8 dispatches
        fill(q, f"s{k}", 4)
        served += drain(q, 8).count("big")
    assert served >= 50 * 8 // 3  # its turn among the few batches queued at a time


def test_a_batch_that_had_nothing_queued_rejoins_without_credit() -> None:
    q = ModelQueues()
    fill(q, "a", 1)
    fill(q, "b", 50)
    drain(q, 21)  # a's one request and 20 of b's
    fill(q, "a", 10)  # a is back: level with b, not 19 turns ahead
    got = drain(q, 6)
    assert 2 <= got.count("a") <= 4


def test_models_are_separate_turns() -> None:
    q = ModelQueues()
    fill(q, "x", 3, "m1")
    fill(q, "y", 3, "m2")
    assert drain(q, 3, "m1") == ["x"] * 3 and q.pop("m1") is None
    assert not q.has_queued("m1") and q.has_queued("m2")
    assert [r.batch_id for r in q.drain("m2")] == ["y"] * 3 and q.models() == []


def test_cancelled_requests_are_skipped_and_purged() -> None:
    q = ModelQueues()
    fill(q, "a", 3)
    fill(q, "b", 2)
    for r in q.queued("m")[:3]:
        r.cancel()
    assert drain(q, 5) == ["b", "b"]
    fill(q, "c", 2)
    q.queued("m")[0].cancel()
    q.purge()
    assert [r.item.line for r in q.queued("m")] == [1]


def test_unknown_fairness_is_refused() -> None:
    with pytest.raises(ValueError, match="fairness"):
        ModelQueues("lottery")


def test_the_engines_own_queue_follows_the_turns_by_priority() -> None:
    """An engine keeps more requests than it runs (`slots.INFLIGHT_FACTOR`): those wait in vLLM's
    queue, which orders them by `priority` (lower first). A request of a batch with little left
    gets a lower one than the big batch's, so it does not wait behind what the big batch already
    has queued there; a batch moved up for its deadline goes first; `fifo` leaves vLLM's order."""
    q = ModelQueues()
    fill(q, "big", 800)
    big = [q.pop("m") for _ in range(48)]
    fill(q, "small", 5)
    nxt = [q.pop("m") for _ in range(4)]
    assert [r.batch_id for r in nxt] == ["big", "small"] * 2
    assert all(r.priority > 700 for r in big + nxt[::2])  # what the big batch has left
    assert [r.priority for r in nxt[1::2]] == [4, 3]
    q.urgent.add("big")
    assert q.pop("m").priority == -1
    fifo = ModelQueues("fifo")
    fill(fifo, "big", 10)
    fill(fifo, "small", 2)
    assert {r.priority for r in (fifo.pop("m") for _ in range(12))} == {0}
