"""Dependent requests through the API, the official SDK and the real executor (test-double engines):
one upload for a judge application; failure propagation and cancel mid-DAG as the output and error
files show them; `request_counts` count every line."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from runtime.config import Config, parse_config
from runtime.executor.executor import PoolExecutor
from scheduler.types import DevicePool
from tests.runtime.clocks import ManualClock
from tests.runtime.fakes import FakeLauncher

from .conftest import ARCH, chat_line, jsonl, poll, read_lines, running

pytestmark = pytest.mark.timeout(60)


def engine_config(state_dir: Path) -> Config:
    models = [{"name": n, "path": f"/nonexistent/{n}", "arch": ARCH, "max_model_len": 1024,
               "max_num_seqs": 4} for n in ("tiny-a", "tiny-b")]
    return parse_config({"server": {"state_dir": str(state_dir)},
                         "devices": {"kind": "cpu", "cpu_kvcache_gib": 0.25}, "models": models})


def dep(cid: str, model: str, text: str, deps: list[str], **body: Any) -> dict[str, Any]:
    return chat_line(cid, model, text, **body) | {"depends_on": deps}


async def start(tmp_path: Path, launcher: FakeLauncher) -> Any:
    cfg = engine_config(tmp_path / "state")
    ex = PoolExecutor(cfg, launcher, pool=DevicePool("cpu", (0, 1), int(0.25 * 2**30)),
                      clock=ManualClock(auto=True))
    return cfg, ex


async def submit(client: Any, lines: list[dict]) -> Any:
    f = await client.files.create(file=("app.jsonl", jsonl(lines)), purpose="batch")
    return await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                       completion_window="24h")


async def test_a_judge_application_in_one_upload(tmp_path: Path) -> None:
    launcher = FakeLauncher(echo=True)
    cfg, ex = await start(tmp_path, launcher)
    lines = [chat_line(f"ans-{i}", "tiny-a", f"question {i}") for i in range(3)]
    lines[2]["body"]["fail_with"] = 500  # the engine fails this answer
    lines += [dep(f"judge-{i}", "tiny-b", f"Answer: {{{{ans-{i}}}}}\nGrade:", [f"ans-{i}"])
              for i in range(3)]
    lines.append(dep("meta", "tiny-a", "{{judge-0}} / {{judge-2}}", ["judge-0", "judge-2"]))
    async with running(cfg, ex) as srv:
        client = srv.client()
        b = await poll(client, (await submit(client, lines)).id)
        assert b.status == "completed"
        assert b.request_counts.total == 7 and b.request_counts.completed == 4
        out = {x["custom_id"]: x for x in await read_lines(client, b.output_file_id)}
        err = {x["custom_id"]: x for x in await read_lines(client, b.error_file_id)}
    assert set(out) == {"ans-0", "ans-1", "judge-0", "judge-1"}
    assert set(err) == {"ans-2", "judge-2", "meta"}

    def text(cid: str) -> str:
        return out[cid]["response"]["body"]["choices"][0]["message"]["content"]
    assert text("judge-0") == f"<tiny-b: Answer: {text('ans-0')}\nGrade:>"
    assert err["judge-2"]["error"]["code"] == "dependency_failed"
    assert "'ans-2'" in err["judge-2"]["error"]["message"]
    assert err["meta"]["error"]["code"] == "dependency_failed"  # two levels down
    assert "'judge-2'" in err["meta"]["error"]["message"]


async def test_cancel_mid_dag_reports_dependents_as_cancelled(tmp_path: Path) -> None:
    launcher = FakeLauncher(delay_s={"tiny-a": 0.3})
    cfg, ex = await start(tmp_path, launcher)
    lines = [chat_line(f"ans-{i}", "tiny-a", "q") for i in range(8)]
    lines += [dep(f"judge-{i}", "tiny-b", "{{ans-%d}}" % i, [f"ans-{i}"]) for i in range(8)]
    async with running(cfg, ex) as srv:
        client = srv.client()
        b = await submit(client, lines)
        await poll(client, b.id, lambda x: x.request_counts.completed >= 1)
        await client.batches.cancel(b.id)
        b = await poll(client, b.id)
        assert b.status == "cancelled" and b.request_counts.total == 16
        out = await read_lines(client, b.output_file_id)
        err = await read_lines(client, b.error_file_id)
    got = [x["custom_id"] for x in out + err]
    assert sorted(got) == sorted(x["custom_id"] for x in lines)  # each line exactly once
    codes = {x["custom_id"]: (x["error"] or {}).get("code") for x in err}
    assert any(c.startswith("judge-") and v == "batch_cancelled" for c, v in codes.items())
    done = {x["custom_id"] for x in out}
    assert all(f"ans-{c[6:]}" in done for c in done if c.startswith("judge-"))


async def test_expiry_mid_dag_reports_dependents_as_expired(tmp_path: Path) -> None:
    from .conftest import Clock
    launcher = FakeLauncher(delay_s={"tiny-a": 0.3})
    cfg = parse_config({"server": {"state_dir": str(tmp_path / "state")},
                        "limits": {"completion_windows": ["1h"]},
                        "devices": {"kind": "cpu", "cpu_kvcache_gib": 0.25},
                        "models": [{"name": n, "path": f"/nonexistent/{n}", "arch": ARCH,
                                    "max_model_len": 1024, "max_num_seqs": 4}
                                   for n in ("tiny-a", "tiny-b")]})
    ex = PoolExecutor(cfg, launcher, pool=DevicePool("cpu", (0, 1), int(0.25 * 2**30)),
                      clock=ManualClock(auto=True))
    lines = [chat_line(f"ans-{i}", "tiny-a", "q") for i in range(8)]
    lines += [dep(f"judge-{i}", "tiny-b", "{{ans-%d}}" % i, [f"ans-{i}"]) for i in range(8)]
    clock = Clock()
    async with running(cfg, ex, clock=clock, expiry_interval_s=0.02) as srv:
        client = srv.client()
        f = await client.files.create(file=("app.jsonl", jsonl(lines)), purpose="batch")
        b = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                        completion_window="1h")
        await poll(client, b.id, lambda x: x.request_counts.completed >= 1)
        clock.offset = 3601
        b = await poll(client, b.id)
        assert b.status == "expired" and b.request_counts.total == 16
        out = await read_lines(client, b.output_file_id)
        err = await read_lines(client, b.error_file_id)
    assert sorted(x["custom_id"] for x in out + err) == sorted(x["custom_id"] for x in lines)
    expired = {x["custom_id"] for x in err if x["error"]["code"] == "batch_expired"}
    assert any(c.startswith("judge-") for c in expired)
