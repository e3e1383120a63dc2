"""Dependent requests (`depends_on`) in the executor: release after durable upstream outcomes,
exact substitution, failure propagation level by level, cancel mid-DAG, resume from journaled
upstream outcomes. The test-double launcher and the real planner."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from runtime.executor_api import Outcome, WorkItem

from .executor_kit import CHAT, Sink, kinds

pytestmark = pytest.mark.timeout(60)


def item(cid: str, model: str, content: str, deps: tuple[str, ...] = (), line: int = 1,
         **body: Any) -> WorkItem:
    b = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 16,
         "custom_tag": cid, **body}
    return WorkItem(line=line, custom_id=cid, model=model, url=CHAT, body=b, prompt_tokens=10,
                    max_tokens=16, depends_on=deps)


def answer(o: Outcome) -> str:
    return o.response_body["choices"][0]["message"]["content"]


class OrderSink(Sink):
    """Also records which custom_ids were durable when each outcome arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.durable_before: dict[str, set[str]] = {}

    async def __call__(self, outcome: Outcome) -> None:
        self.durable_before[outcome.custom_id] = {o.custom_id for o in self.outcomes}
        await super().__call__(outcome)


async def test_a_chain_across_models_runs_in_order_with_exact_substitution(run, launcher) -> None:
    launcher.echo = True
    ex = await run()
    tricky = 'quotes " and \\ backslash, {braces}, ünïcode ✓\nnew line, {{not-an-id}}'
    work = [item("q", "a", tricky, line=1),
            item("fuse", "b", "A said [{{q}}] and again [{{q}}]", ("q",), line=2),
            item("judge", "c", "grade: {{fuse}}", ("fuse",), line=3)]
    ex.submit("x", work, sink := OrderSink())
    await asyncio.wait_for(ex.wait("x"), 30)
    got = sink.by_id()
    assert all(o.ok for o in got.values())
    a = answer(got["q"])
    assert a == f"<a: {tricky}>"
    assert answer(got["fuse"]) == f"<b: A said [{a}] and again [{a}]>"
    assert answer(got["judge"]) == f"<c: grade: {answer(got['fuse'])}>"
    # each dependent was sent only after its upstream outcome was durable
    assert "q" in sink.durable_before["fuse"] and "fuse" in sink.durable_before["judge"]
    sent = [b["custom_tag"] for b in launcher.bodies]
    assert sent == ["q", "fuse", "judge"]


async def test_an_ensemble_fuser_waits_for_every_generator(run, launcher) -> None:
    launcher.echo = True
    ex = await run()
    work = []
    for k in range(4):
        ids = tuple(f"{m}-{k}" for m in "ab")
        work += [item(f"{m}-{k}", m, f"question {k}") for m in "ab"]
        work.append(item(f"fuse-{k}", "c", " | ".join("{{%s}}" % i for i in ids), ids))
    ex.submit("x", work, sink := OrderSink())
    await asyncio.wait_for(ex.wait("x"), 30)
    got = sink.by_id()
    assert len(got) == 12 and all(o.ok for o in got.values())
    for k in range(4):
        assert {f"a-{k}", f"b-{k}"} <= sink.durable_before[f"fuse-{k}"]
        assert answer(got[f"fuse-{k}"]) == (
            f"<c: {answer(got[f'a-{k}'])} | {answer(got[f'b-{k}'])}>")
    assert "model_finished" in kinds(ex.events("x"))


async def test_a_failed_upstream_fails_its_dependents_level_by_level(run, launcher) -> None:
    ex = await run()
    work = [item("root", "a", "hi", fail_with=500),
            item("mid", "b", "{{root}}", ("root",)),
            item("leaf", "c", "{{mid}}", ("mid",)),
            item("other", "a", "fine"),
            item("other-dep", "b", "{{other}}", ("other",))]
    ex.submit("x", work, sink := Sink())
    await asyncio.wait_for(ex.wait("x"), 30)
    got = sink.by_id()
    assert set(got) == {"root", "mid", "leaf", "other", "other-dep"}
    assert not got["root"].ok and got["other"].ok and got["other-dep"].ok
    assert got["mid"].error["code"] == "dependency_failed" and "'root'" in got["mid"].error["message"]
    assert got["leaf"].error["code"] == "dependency_failed" and "'mid'" in got["leaf"].error["message"]
    assert {b["custom_tag"] for b in launcher.bodies} == {"other", "other-dep"}  # never sent


async def test_cancel_mid_dag_cancels_the_waiting_dependents(run, launcher) -> None:
    launcher.delay_s.update(a=0.3)
    ex = await run()
    work = [item(f"a-{i}", "a", "hi") for i in range(4)]
    work += [item(f"b-{i}", "b", "{{a-%d}}" % i, (f"a-{i}",)) for i in range(4)]
    ex.submit("x", work, sink := Sink())
    while not launcher.posts:
        await asyncio.sleep(0.005)
    await asyncio.wait_for(ex.cancel("x"), 10)
    n = len(sink.outcomes)
    await asyncio.wait_for(ex.wait("x"), 1)
    await asyncio.sleep(0.3)
    assert len(sink.outcomes) == n and all(o.custom_id.startswith("a-") for o in sink.outcomes)
    assert not any(b["custom_tag"].startswith("b-") for b in launcher.bodies)
    assert launcher.alive() == []


async def test_resumed_dependents_take_upstream_outputs_from_the_journal(run, launcher) -> None:
    """After a restart the gateway submits only what its journal lacks, with the journaled outcomes
    the pending requests depend on: those are not run again, their text is substituted."""
    launcher.echo = True
    ex = await run()
    done = Outcome(custom_id="q", line=1, model="a", status_code=200, response_body={
        "object": "chat.completion", "choices": [{"message": {"content": "journaled ✓"}}],
        "usage": {"completion_tokens": 3}})
    failed = Outcome(custom_id="bad", line=2, model="a", status_code=None,
                     error={"code": "engine_failed", "message": "x"})
    work = [item("dep", "b", "got {{q}}", ("q",), line=3),
            item("dep-bad", "b", "got {{bad}}", ("bad",), line=4),
            item("dep-dep", "c", "{{dep-bad}}", ("dep-bad",), line=5)]
    ex.submit("x", work, sink := Sink(), known={"q": done, "bad": failed})
    await asyncio.wait_for(ex.wait("x"), 30)
    got = sink.by_id()
    assert answer(got["dep"]) == "<b: got journaled ✓>"
    assert got["dep-bad"].error["code"] == "dependency_failed"
    assert got["dep-dep"].error["code"] == "dependency_failed"
    assert [b["custom_tag"] for b in launcher.bodies] == ["dep"]


async def test_a_too_long_substituted_prompt_is_that_requests_own_error(run, launcher) -> None:
    """The engine refuses it (400, as vLLM does past max_model_len): one error line, not the batch's."""
    ex = await run()
    work = [item("up", "a", "hi"), item("down", "b", "{{up}}", ("up",), messages=None)]
    work[1].body.pop("messages")  # the double answers 400 to a body without messages
    ex.submit("x", work, sink := Sink())
    await asyncio.wait_for(ex.wait("x"), 30)
    got = sink.by_id()
    assert got["up"].ok and got["down"].status_code == 400


async def test_dependents_released_for_a_model_without_an_engine_get_one(run, launcher,
                                                                        tmp_path) -> None:
    """The plan may leave the downstream model out until its inputs exist; once dependents are
    released for it, a pass starts its engine (no event would come otherwise)."""
    from runtime.executor.executor import PoolExecutor
    from scheduler.types import DevicePool, ExecPlan, Schedule, Stage

    from .clocks import ManualClock
    from .executor_kit import make_cfg
    calls = []

    def scripted(problem, strategy):  # upstream only in the first two passes, then what is left
        calls.append(sorted(problem.work))
        models = ["a"] if len(calls) <= 2 else sorted(problem.work)
        plans = [ExecPlan(m, 1, 1, (i,)) for i, m in enumerate(models)]
        return Schedule(strategy, [Stage(plans, 0.0, 1.0)], 1.0)

    async def slow_sink(outcome: Outcome) -> None:  # durable only after the upstream model drained
        await asyncio.sleep(0.2)
        await sink(outcome)

    sink = Sink()
    ex = PoolExecutor(make_cfg(tmp_path), launcher, planner=scripted, clock=ManualClock(auto=True),
                      pool=DevicePool("cpu", (0, 1), int(0.25 * 2**30)))
    await ex.start()
    try:
        ex.submit("x", [item("up", "a", "hi"), item("down", "b", "{{up}}", ("up",))], slow_sink)
        await asyncio.wait_for(ex.wait("x"), 20)
    finally:
        await ex.close()
    got = sink.by_id()
    assert got["up"].ok and got["down"].ok
    assert any(r.startswith("released:b") for e in ex.events("x") if e["event"] == "replan"
               for r in e["reasons"])
