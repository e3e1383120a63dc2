"""Work ordered by shared prefix: a batch's requests grouped by their prefix chain (`prefix_order`),
two replicas of a model taking from the two ends of its queue while it holds one batch (prefix
affinity) and from its head across batches (an earlier batch is never overtaken), and the hits a
served response reports taken out of its calibration record."""

from __future__ import annotations

from runtime.executor.planning import served_record
from runtime.executor.pool_state import Req, ReqState, prefix_order
from runtime.executor.queues import ModelQueues
from runtime.executor_api import WorkItem

CHAT = "/v1/chat/completions"


def item(n: int, prefix: tuple[int, ...] = (), model: str = "m") -> WorkItem:
    it = WorkItem(n, f"r{n}", model, CHAT, body={"model": model}, prompt_tokens=10, max_tokens=4)
    it.prefix = prefix
    return it


def test_requests_sharing_a_prefix_end_up_next_to_each_other() -> None:
    a, b = (11, 12), (21,)
    items = [item(1, a), item(2, b), item(3), item(4, a[:1]), item(5, a), item(6, b)]
    got = [it.line for it in prefix_order(items)]
    assert got.index(5) == got.index(1) + 1 and got.index(6) == got.index(2) + 1
    assert got.index(4) == got.index(1) - 1  # the shorter shared chain sits before its branch
    assert got[0] == 3  # sharing nothing: first, in input order


def test_a_batch_that_shares_nothing_keeps_its_input_order() -> None:
    items = [item(n) for n in range(1, 6)]
    assert prefix_order(items) == items


def _queue(batches: dict[str, int], fairness: str = "fair") -> ModelQueues:
    q = ModelQueues(fairness)
    n = 0
    for batch, count in batches.items():
        for _ in range(count):
            n += 1
            q.push(Req(batch, item(n)))
    return q


def test_two_replicas_take_one_batch_from_its_two_ends() -> None:
    q = _queue({"b1": 6})
    head = [q.pop("m").item.line for _ in range(2)]
    tail = [q.pop("m", tail=True).item.line for _ in range(2)]
    assert head == [1, 2] and tail == [6, 5]


def test_cancelled_tail_requests_are_skipped() -> None:
    q = _queue({"b1": 4})
    reqs = q.queued("m")
    reqs[3].cancel()
    assert reqs[3].state is ReqState.CANCELLED
    assert q.pop("m", tail=True).item.line == 3


def test_cached_prompt_tokens_are_not_counted_as_computed() -> None:
    usage = {"prompt_tokens": 900, "completion_tokens": 16,
             "prompt_tokens_details": {"cached_tokens": 864}}
    rec = served_record({"usage": usage}, 800, 0.0, 1.0, 2.0)
    assert rec is not None and rec.prompt_tokens == 36 and rec.output_tokens == 16
    plain = served_record({"usage": {"prompt_tokens": 900, "completion_tokens": 16,
                                     "prompt_tokens_details": None}}, 800, 0.0, 1.0, 2.0)
    assert plain is not None and plain.prompt_tokens == 900
