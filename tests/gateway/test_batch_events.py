"""`GET /v1/batches/{id}/events` and the Batch object's `estimated_completion_at`, through the
official SDK: paging with the SDK's own cursor pager, key isolation, persistence across a restart,
the bound on stored events, and the real executor's plan and engine events reaching the API."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.pagination import AsyncCursorPage

from gateway.db import Database
from gateway.events import MAX_EVENTS_PER_BATCH, BatchEvents

from .conftest import chat_line, held_batch, jsonl, plan_only_config, poll, running
from .test_deps_flow import start
from tests.runtime.fakes import FakeLauncher

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(60)]
CHAT = "/v1/chat/completions"


class BatchEvent(openai.BaseModel):
    id: str
    object: str
    created_at: int
    type: str
    data: dict[str, Any]


def pager(client: Any, batch_id: str, **params: Any) -> Any:
    """The SDK's cursor pager over the events (as `client.batches.list` pages batches)."""
    return client.get_api_list(f"/batches/{batch_id}/events", model=BatchEvent,
                               page=AsyncCursorPage[BatchEvent], options={"params": params})


async def page(client: Any, batch_id: str, **params: Any) -> dict[str, Any]:
    return await client.get(f"/batches/{batch_id}/events", cast_to=object,
                            options={"params": params})


async def run_batch(client: Any, lines: list[Any]) -> Any:
    f = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    b = await client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    return await poll(client, b.id)


async def test_events_page_with_the_sdk_cursor_pager(cfg):
    async with running(cfg) as srv:
        client = srv.client()
        b = await run_batch(client, [chat_line("a"), chat_line("b", model="tiny-b")])
        assert b.status == "completed"
        full = await page(client, b.id)
        assert full["object"] == "list" and full["has_more"] is False
        events = full["data"]
        types = [e["type"] for e in events]
        assert types[0] == "batch_submitted" and "plan" in types and types[-1] == "batch_finished"
        assert all(e["object"] == "batch.event" and isinstance(e["created_at"], int)
                   for e in events)
        assert abs(events[0]["created_at"] - time.time()) < 60
        assert full["first_id"] == events[0]["id"] and full["last_id"] == events[-1]["id"]
        assert len({e["id"] for e in events}) == len(events)
        # the SDK's auto-pager walks them one by one, each once, in order
        walked = [e async for e in pager(client, b.id, limit=1)]
        assert [e.id for e in walked] == [e["id"] for e in events]
        first = await page(client, b.id, limit=1)
        assert len(first["data"]) == 1 and first["has_more"] is True
        rest = await page(client, b.id, after=events[0]["id"])
        assert [e["id"] for e in rest["data"]] == [e["id"] for e in events[1:]]
        tail = await page(client, b.id, after=events[-1]["id"])
        assert tail["data"] == [] and tail["has_more"] is False
        for bad in ({"limit": 0}, {"limit": 1001}, {"limit": "x"}):
            with pytest.raises(openai.BadRequestError):
                await page(client, b.id, **bad)
        with pytest.raises(openai.NotFoundError):
            await page(client, b.id, after="batchevent_nope")
        with pytest.raises(openai.NotFoundError):
            await page(client, "batch_nope")


async def test_plan_events_carry_this_batch_only_and_set_the_eta(cfg):
    async with running(cfg) as srv:
        srv.executor.predict_s = 3600.0
        client = srv.client()
        _, b = await held_batch(srv, [chat_line(f"r{i}") for i in range(3)])
        other_f = await client.files.create(file=("o.jsonl", jsonl([chat_line("x")])),
                                            purpose="batch")
        other = await client.batches.create(input_file_id=other_f.id, endpoint=CHAT,
                                            completion_window="24h")
        live = await poll(client, b.id,
                          lambda x: (x.model_extra or {}).get("estimated_completion_at"))
        eta = live.model_extra["estimated_completion_at"]
        assert isinstance(eta, int) and abs(eta - (time.time() + 3600)) < 60
        assert getattr(live, "estimated_completion_at") == eta
        # the SDK keeps the per-model counts the CLI draws its bars from
        assert live.model_extra["model_request_counts"] == {
            "tiny-a": {"total": 3, "completed": 0, "failed": 0}}
        await poll(client, other.id,
                   lambda x: (x.model_extra or {}).get("estimated_completion_at"))
        events = (await page(client, b.id))["data"]
        plans = [e for e in events if e["type"] in ("plan", "replan")]
        assert plans and plans[-1]["data"]["predicted_completion_s"] == 3600.0
        assert abs(plans[-1]["data"]["predicted_completion_at"] - eta) <= 1
        # another batch's id never shows in this batch's events (it may be another key's)
        assert other.id not in str(events)
        assert all("batches_predicted_s" not in e["data"] for e in events)
        srv.executor.release(4)
        done = await poll(client, b.id)
        assert done.status == "completed" and done.model_extra["estimated_completion_at"] is None
        fresh = await client.batches.create(input_file_id=other_f.id, endpoint=CHAT,
                                            completion_window="24h")
        assert fresh.model_extra["estimated_completion_at"] is None  # no plan yet


async def test_events_are_per_key(tmp_path):
    keys = ["sk-alice-123456", "sk-bob-12345678"]
    async with running(plan_only_config(tmp_path, api_keys=keys)) as srv:
        alice, bob = srv.client(keys[0]), srv.client(keys[1])
        b = await run_batch(alice, [chat_line("a")])
        assert (await page(alice, b.id))["data"]
        with pytest.raises(openai.NotFoundError):
            await page(bob, b.id)
        bobs = await run_batch(bob, [chat_line("a")])
        first = (await page(bob, bobs.id))["data"][0]["id"]
        with pytest.raises(openai.NotFoundError):  # a cursor of another batch's events
            await page(alice, b.id, after=first)
        with pytest.raises(openai.AuthenticationError):
            await page(srv.client("sk-wrong-000000"), b.id)


async def test_events_of_an_ended_batch_survive_a_restart(cfg):
    async with running(cfg) as srv:
        client = srv.client()
        b = await run_batch(client, [chat_line("a"), chat_line("b")])
        before = (await page(client, b.id))["data"]
        assert before[-1]["type"] == "batch_finished"
    async with running(cfg) as srv2:  # a fresh executor knows nothing of it
        client = srv2.client()
        assert (await page(client, b.id))["data"] == before
        assert (await client.batches.retrieve(b.id)).model_extra["estimated_completion_at"] is None


async def test_stored_events_are_bounded_keeping_the_timeline(tmp_path: Path) -> None:
    db = Database(tmp_path / "db.sqlite")
    events = BatchEvents(db)
    cap = MAX_EVENTS_PER_BATCH
    t = 1.7e9

    def emit(kind: str, **data: Any) -> None:
        events.record(["b1"], {"time": t, "event": kind, **data})

    emit("batch_submitted", requests=5, pooled_with=["batch_other", "b3"])
    emit("plan", batches_predicted_s={"b1": 10.0, "batch_other": 99.0}, stage=[],
         reasons=["batch_submitted:batch_other", "batch_submitted:b1", "model_finished:m"])
    emit("engine_start", model="tiny-a")
    for i in range(cap + 50):
        emit("replan", n=i, batches_predicted_s={"b1": 5.0})
    emit("engine_stop", model="tiny-a")
    emit("batch_finished")
    events.flush()
    rows, more = events.page("b1", after=None, limit=10 * cap)
    assert len(rows) == cap and not more
    types = [r["type"] for r in rows]
    assert types[:3] == ["batch_submitted", "plan", "engine_start"]
    assert types[-2:] == ["engine_stop", "batch_finished"]
    replans = [r["data"]["n"] for r in rows if r["type"] == "replan"]
    assert replans == list(range(cap + 50 - len(replans), cap + 50))  # the latest kept
    assert rows[0]["data"]["pooled_with"] == 2
    assert rows[1]["data"]["predicted_completion_s"] == 10.0
    assert rows[1]["data"]["reasons"] == ["batch_submitted:another batch", "batch_submitted:b1",
                                          "model_finished:m"]
    assert "batch_other" not in str(rows)
    events.close()
    db.close()


async def test_the_real_executor_reports_plans_and_engines(tmp_path: Path) -> None:
    launcher = FakeLauncher(echo=True)
    cfg, ex = await start(tmp_path, launcher)
    lines = [chat_line(f"a{i}", "tiny-a") for i in range(4)] + \
        [chat_line(f"b{i}", "tiny-b") for i in range(4)]
    async with running(cfg, ex) as srv:
        client = srv.client()
        b = await run_batch(client, lines)
        assert b.status == "completed"
        events = [e async for e in pager(client, b.id, limit=3)]
    types = [e.type for e in events]
    for kind in ("batch_submitted", "plan", "engine_start", "engine_started", "model_finished",
                 "batch_finished"):
        assert kind in types, (kind, types)
    plan = next(e for e in events if e.type == "plan")
    assert plan.data["stage"] and "predicted_makespan_s" in plan.data
    assert plan.data["strategy"] and plan.data["reasons"]
    assert plan.data["predicted_completion_s"] >= 0
    assert {e.data["model"] for e in events if e.type == "engine_start"} == {"tiny-a", "tiny-b"}
