"""The status page in a real browser (headless chromium): a running batch on the real executor with
test-double engines shows on the list and on its own page with per-model progress, the plan's
stages and the engines in the Gantt chart, and its events; with API keys the page asks for the key,
sends it as the Authorization header only (never in a URL or a cookie), and the page's data routes
answer 401 without it. The README's screenshot comes from the first test
(`SAMULLM_STATUS_SCREENSHOT=docs/status-page.png`)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.ui import STATIC
from gateway.ui_svg import engine_bars, gantt_svg, planned_bars
from runtime.executor.executor import PoolExecutor
from scheduler.types import DevicePool
from tests.runtime.fakes import FakeLauncher

from .browser import DevTools, dump_dom, needs_chromium, screenshot
from .conftest import chat_line, jsonl, plan_only_config, poll, running
from .test_deps_flow import engine_config

pytestmark = pytest.mark.timeout(180)


def browser_test(test: Any) -> Any:
    return needs_chromium(pytest.mark.asyncio(loop_scope="session")(test))
CHAT = "/v1/chat/completions"
KEY = "sk-status-page-key-0123456789"


async def submit(client: Any, lines: list[dict[str, Any]]) -> Any:
    f = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    return await client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")


def per_model(b: Any) -> dict[str, dict[str, int]]:
    return (b.model_extra or {}).get("model_request_counts") or {}


@browser_test
async def test_a_running_batch_its_progress_plan_and_engines(tmp_path: Path) -> None:
    # tiny-a's requests are quick; half of tiny-b's run for a minute (the batch stays in progress)
    launcher = FakeLauncher(delay_s={"tiny-a": 0.2}, step_s={"tiny-b": 0.06}, output_tokens=2000)
    cfg = engine_config(tmp_path / "state")
    ex = PoolExecutor(cfg, launcher, pool=DevicePool("cpu", (0, 1, 2, 3), int(0.25 * 2**30)))
    lines = [chat_line(f"a{i}", "tiny-a", f"question {i}") for i in range(24)]
    lines += [chat_line(f"b{i}", "tiny-b", f"summary {i}", max_tokens=4 if i < 8 else 1000)
              for i in range(16)]
    async with running(cfg, ex) as srv:
        client = srv.client()
        b = await submit(client, lines)
        b = await poll(client, b.id, lambda x: x.status != "in_progress" and x.status != "validating"
                       or per_model(x).get("tiny-a", {}).get("completed") == 24
                       and per_model(x).get("tiny-b", {}).get("completed", 0) >= 4, timeout_s=60)
        assert b.status == "in_progress", b

        dom = await dump_dom(f"{srv.url}/ui#{b.id}")
        page = re.search(r'<section class="batch-page" data-batch="([^"]+)" '
                         r'data-status="([^"]+)"', dom)
        assert page and page.groups() == (b.id, "in_progress"), dom[-3000:]
        bars = dict(re.findall(r'data-model="(tiny-[ab])"><span class="name">[^<]*</span>'
                               r'<div class="progress"[^>]*data-completed="(\d+)"', dom))
        assert bars["tiny-a"] == "24" and int(bars["tiny-b"]) >= 4
        assert 'data-total="16"' in dom and 'data-total="24"' in dom
        assert '<svg class="gantt"' in dom
        planned = set(re.findall(r'<g class="bar plan[^"]*" data-model="([^"]+)"', dom))
        ran = set(re.findall(r'<g class="bar ran serving" data-model="([^"]+)"', dom))
        assert planned and planned <= {"tiny-a", "tiny-b"}, planned
        assert ran == {"tiny-a", "tiny-b"}  # both engines served
        events = re.findall(r'<li class="ev [^"]*" data-type="([^"]+)"', dom)
        for kind in ("batch_submitted", "plan", "engine_start", "engine_started", "model_finished"):
            assert kind in events, (kind, events)
        # the latest plan's estimate (the planner does not know these engines: it may be past)
        assert 'class="eta' in re.search(r"<dt>Completion</dt><dd>(.*?)</dd>", dom).group(1)
        assert f'data-file="{b.input_file_id}"' in dom

        listing = await dump_dom(f"{srv.url}/")
        row = re.search(rf'<tr class="batch" data-batch="{b.id}" data-status="in_progress">(.*?)'
                        r'</tr>', listing)
        assert row and 'data-model="tiny-a"' in row.group(1) and 'data-model="tiny-b"' in row.group(1)

        shot = Path(os.environ.get("SAMULLM_STATUS_SCREENSHOT") or tmp_path / "status-page.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        await screenshot(f"{srv.url}/ui#{b.id}", shot.resolve())
        png = shot.read_bytes()
        assert png.startswith(b"\x89PNG") and 10_000 < len(png) < 300_000
        await client.batches.cancel(b.id)
        assert (await poll(client, b.id)).status == "cancelled"


@browser_test
async def test_with_keys_the_page_asks_for_the_key_and_sends_it_as_a_header(tmp_path: Path
                                                                          ) -> None:
    other = "sk-another-key-000000000"
    async with running(plan_only_config(tmp_path / "state", api_keys=[KEY, other])) as srv:
        srv.executor.hold()
        client = srv.client(KEY)
        b = await submit(client, [chat_line("a"), chat_line("b", "tiny-b")])
        await poll(client, b.id, lambda x: x.status == "in_progress")
        async with aiohttp.ClientSession() as http:
            for path in ("/", "/ui", "/ui/status.js", "/ui/status.css"):  # the shell: no data
                async with http.get(srv.url + path) as r:
                    assert r.status == 200 and b.id not in await r.text()
            for path in ("/ui/fragments/batches", f"/ui/fragments/batches/{b.id}",
                         f"/v1/batches/{b.id}/events", f"/v1/files/{b.input_file_id}/content"):
                for headers in ({}, {"Authorization": "Bearer sk-wrong-key-000000"}):
                    async with http.get(srv.url + path, headers=headers) as r:
                        assert r.status == 401, path
                        assert (await r.json())["error"]["code"] == "invalid_api_key"
            async with http.get(f"{srv.url}/ui/fragments/batches/{b.id}",
                                headers={"Authorization": "Bearer " + KEY}) as r:
                assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
            theirs = {"Authorization": "Bearer " + other}  # another key sees none of it
            async with http.get(f"{srv.url}/ui/fragments/batches/{b.id}", headers=theirs) as r:
                assert r.status == 404
            async with http.get(f"{srv.url}/ui/fragments/batches", headers=theirs) as r:
                assert r.status == 200 and b.id not in await r.text()

        async with DevTools() as tab:
            await tab.send("Page.navigate", url=f"{srv.url}/ui")
            await tab.until("!document.getElementById('key-form').hidden")
            assert await tab.js("document.getElementById('view').textContent") == ""
            for typed in ("sk-wrong-key-000000", KEY):  # as a user types it, then submits
                await tab.js("document.getElementById('key').focus()")
                await tab.send("Input.insertText", text=typed)
                await tab.js("document.getElementById('key-submit').click()")
                if typed != KEY:
                    await tab.until("document.getElementById('key-error').textContent"
                                    ".includes('refused')")
            await tab.until(f"document.querySelector('tr.batch[data-batch=\"{b.id}\"]')")
            await tab.js(f"location.hash = '{b.id}'")
            await tab.until("document.querySelector('section.batch-page svg.gantt')")
            text = await tab.js("document.querySelector('section.batch-page').textContent")
            assert b.id in text and "plan" in text
            assert await tab.js("sessionStorage.getItem('samullm.api-key')") == KEY
            assert await tab.js("document.cookie") == ""
            cookies = (await tab.send("Network.getCookies"))["cookies"]
            href = await tab.js("location.href")
        assert not cookies and KEY not in href
        sent = tab.requests
        assert sent and all(KEY not in r["url"] for r in sent), [r["url"] for r in sent]
        authed = [r for r in sent if "/ui/fragments/" in r["url"]
                  and r["headers"].get("Authorization") == f"Bearer {KEY}"]
        assert any(r["url"].endswith("/ui/fragments/batches") for r in authed)
        assert any(r["url"].endswith(f"/ui/fragments/batches/{b.id}") for r in authed)
        srv.executor.release(2)
        assert (await poll(client, b.id)).status == "completed"


def test_the_script_sends_the_key_in_a_header_only() -> None:
    """What the browser tests cannot see every path of: the key input has no name (a form sent
    without the script carries nothing), the script never writes a cookie, a URL or local storage
    with it, and nothing is loaded from outside the gateway."""
    html = (STATIC / "status.html").read_text()
    js = (STATIC / "status.js").read_text()
    key_input = re.search(r"<input[^>]*id=\"key\"[^>]*>", html).group(0)
    assert "name=" not in key_input and 'type="password"' in key_input
    assert "document.cookie" not in js and "localStorage" not in js
    # the key is put into one string only: the header's value
    built = [ln.strip() for ln in js.splitlines() if re.search(r"\+\s*key\(\)|key\(\)\s*\+", ln)]
    assert built == ['const headers = key() ? { Authorization: "Bearer " + key() } : {};'], built
    assert re.findall(r"sessionStorage\.setItem\([^)]*\)", js) == ["sessionStorage.setItem(STORE, value)"]
    assert not re.search(r"https?://", html + js + (STATIC / "status.css").read_text())


def test_the_chart_draws_every_planned_stage_and_each_engine_as_it_ran() -> None:
    t0 = 1.7e9

    def ev(kind: str, at: float, **data: Any) -> dict[str, Any]:
        return {"type": kind, "created_at": int(t0 + at), "data": {"time": t0 + at, **data}}

    a = {"model": "<a>", "tp": 1, "dp": 1, "devices": [0]}
    b = {"model": "b", "tp": 2, "dp": 1, "devices": [1, 2]}
    events = [ev("plan", 1, stage=[a], stages=1, predicted_makespan_s=5),
              ev("replan", 2, schedule=[{"start_s": 0, "end_s": 4, "plans": [a, b]},
                                        {"start_s": 4, "end_s": 9, "plans": [b]}]),
              ev("engine_start", 2, slot=1, **a), ev("engine_started", 3, slot=1, **a),
              ev("engine_start", 2, slot=2, **b), ev("engine_start_failed", 4, slot=2, **b,
                                                     message="boom"),
              ev("engine_stop", 6, slot=1, **a)]
    plan = planned_bars(events)  # the latest plan's two stages, from its own time
    assert [(x.model, x.devices, x.start - t0, x.end - t0, x.phase) for x in plan] == [
        ("<a>", (0,), 2, 6, "stage 1"), ("b", (1, 2), 2, 6, "stage 1"),
        ("b", (1, 2), 6, 11, "stage 2")]
    ran = engine_bars(events, now=t0 + 10)
    assert sorted((x.model, x.phase, x.start - t0, x.end - t0, x.note) for x in ran) == [
        ("<a>", "serving", 3, 6, "stopped"), ("<a>", "starting", 2, 3, ""),
        ("b", "starting", 2, 4, "failed to start")]
    svg = gantt_svg(events, start=t0, now=t0 + 10, live=True)
    assert "<a>" not in svg and "&lt;a&gt;" in svg and 'class="now"' in svg
    assert svg.count('class="bar plan') == 5  # a plan on two devices is a bar on each
    assert gantt_svg([], start=t0, now=t0, live=True) == '<p class="empty">No plan yet.</p>'
