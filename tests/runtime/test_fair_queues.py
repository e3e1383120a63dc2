"""Whose request a model's engines take next (`runtime.executor.queues.ModelQueues`): the batch with
the least left, aged by how long it waited (a small batch that arrives behind a big one is
dispatched at once, the big one is never starved), a batch that left and comes back has no credit
for the time it was away, and `fifo` keeps arrival order."""

from __future__ import annotations

import math

import pytest

from runtime.executor.pool_state import Req, ReqState
from runtime.executor.queues import AGING, ModelQueues, serving_order
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


def test_a_small_batch_behind_a_big_one_is_dispatched_first() -> None:
    q = ModelQueues()
    fill(q, "big", 800)
    assert drain(q, 300) == ["big"] * 300  # the big batch alone: it is served
    fill(q, "small", 5)
    assert drain(q, 6) == ["small"] * 5 + ["big"]  # the least left first
    assert drain(q, 1000).count("big") == 499  # nothing lost


def test_a_waiting_batch_ages_until_it_goes_first() -> None:
    """A batch's claim grows by `AGING` requests for each dispatch it waits: a 200-request batch
    behind a 100-request one goes first once (200 - 100) / (AGING - 1) dispatches have gone to
    the other, not after all of it."""
    q = ModelQueues()
    fill(q, "big", 200)
    fill(q, "mid", 100)
    got = drain(q, 100)
    first_big = got.index("big")
    assert got[:first_big] == ["mid"] * first_big
    assert first_big == math.floor((200 - 100) / (AGING - 1)) + 1
    assert got.count("big") >= 2  # and again after each wait of its own


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
    fill(q, "b", 120)
    drain(q, 41)  # a's one request and 40 of b's
    fill(q, "a", 100)  # a is back, with more left than b: no claim for the 40 dispatches away
    assert drain(q, 4) == ["b"] * 4
    assert "a" in drain(q, 20)  # and its own wait counts from its return


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
    nxt = [q.pop("m") for _ in range(6)]
    assert [r.batch_id for r in nxt] == ["small"] * 5 + ["big"]
    # what the batch has left, to a power of two (so a batch's own requests keep their order)
    assert {r.priority for r in big + nxt[5:]} == {10}
    assert [r.priority for r in nxt[:5]] == [3, 2, 2, 1, 0]
    q.urgent.add("big")
    assert q.pop("m").priority == -1
    fifo = ModelQueues("fifo")
    fill(fifo, "big", 10)
    fill(fifo, "small", 2)
    assert {r.priority for r in (fifo.pop("m") for _ in range(12))} == {0}


@pytest.mark.parametrize("fairness", ["fair", "fifo"])
def test_the_order_the_planner_sees_is_the_order_pop_hands_out(fairness) -> None:
    """`order` (what `serving_order` gives the planner) is the sequence of `pop`s, mid-way through
    a drain too (the aging state carries over), cancelled requests left out."""
    q = ModelQueues(fairness)
    fill(q, "big", 300)
    drain(q, 40)
    fill(q, "mid", 120)
    fill(q, "small", 7)
    drain(q, 3)
    fill(q, "late", 30)
    cancelled = q.queued("m")[5]
    cancelled.state = ReqState.CANCELLED
    predicted = q.order("m")
    assert cancelled not in predicted
    got = [q.pop("m") for _ in range(len(predicted) + 1)]
    assert got[-1] is None and got[:-1] == predicted


def test_serving_order_puts_in_flight_first_then_the_queues_turns_then_the_waiting() -> None:
    q = ModelQueues()
    big = [req("big", n) for n in range(50)]
    small = [req("small", n) for n in range(3)]
    waiting = req("dep", 0)
    waiting.state = ReqState.WAITING
    for r in big + small:
        q.push(r)
    sent = q.pop("m")
    sent.state = ReqState.INFLIGHT
    arrival = big + small + [waiting]
    got = serving_order(arrival, q)
    assert got[0] is small[0] is sent  # the small batch went first, and is in flight
    assert got[1:3] == small[1:] and got[3:-1] == big and got[-1] is waiting
    assert serving_order(arrival, ModelQueues("fifo")) == arrival


def test_a_batchs_claim_is_what_it_has_left_on_every_model() -> None:
    """A 2,000-request batch with 12 requests left queued for `medium` and 400 open on other
    models is not the shorter one beside a 20-request batch: by its queue of `medium` it went
    first, and the small batch waited at the engine's in-flight cap for the big one's answers
    (the fairness bench of 6 Dec 2026: 4.07 s inside the gateway against 0.87 s alone, its
    preemption 2.3 s late, aborting 61 of the big batch's requests on `medium`). Its completion
    waits for all it has left, as the seats count it (`SlotHost.batch_size`); the requests'
    `priority` is that size too."""
    left = {"big": 412, "small": 20}
    q = ModelQueues(left_of=left.__getitem__)
    fill(q, "big", 12)
    fill(q, "small", 20)
    assert q.next_priority("m") == (20 .bit_length(), "small")
    assert drain(q, 21) == ["small"] * 20 + ["big"]
    assert q.pop("m").priority == 412 .bit_length()
    assert drain(ModelQueues(), 1) == []  # without `left_of`: each queue's own length, as before
    alone = ModelQueues()
    fill(alone, "big", 12)
    fill(alone, "small", 20)
    assert drain(alone, 1) == ["big"]
