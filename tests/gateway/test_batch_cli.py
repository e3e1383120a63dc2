"""`samullm batch submit | watch | results` against a live test gateway: through `cli.main.main` (in
a thread, as the gateway runs on the test's loop) and as a subprocess, with API keys."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from cli.main import main

from .conftest import chat_line, jsonl, plan_only_config, poll, running

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(60)]
KEY = "sk-cli-key-000001"
REPO = Path(__file__).resolve().parents[2]


def cli(srv: Any, *argv: str, key: str = KEY) -> list[str]:
    return [*argv, "--base-url", f"{srv.url}/v1", "--api-key", key]


async def run(argv: list[str], capsys: Any) -> tuple[int, str, str]:
    rc = await asyncio.to_thread(main, argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def keyed(tmp_path: Path) -> Any:
    return plan_only_config(tmp_path / "state", api_keys=[KEY])


async def test_submit_watch_and_results(keyed, tmp_path, capsys):
    lines = [chat_line("a"), chat_line("b", model="tiny-b"), chat_line("c", text="FAIL")]
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl(lines))
    async with running(keyed) as srv:
        rc, out, err = await run(cli(srv, "batch", "submit", str(src), "--watch",
                                     "--interval", "0.05", "--metadata", "team=ml"), capsys)
        assert rc == 0, err
        bid = out.strip()
        assert bid.startswith("batch_")
        b = await srv.client(KEY).batches.retrieve(bid)
        assert b.status == "completed" and b.metadata == {"team": "ml"}
        assert "tiny-a" in err and "tiny-b" in err  # a bar per model
        assert f"batch {bid} completed: 2 completed, 1 failed" in err
        assert " plan " in err and "batch_finished" in err  # the events, as they came

        dest = tmp_path / "out.jsonl"
        rc, _, err = await run(cli(srv, "batch", "results", bid, "-o", str(dest)), capsys)
        assert rc == 0, err
        got = [json.loads(x) for x in dest.read_text().splitlines()]
        assert sorted(x["custom_id"] for x in got) == ["a", "b"]
        errs = tmp_path / "err.jsonl"
        rc, _, _ = await run(cli(srv, "batch", "results", bid, "--errors", "-o", str(errs)),
                             capsys)
        assert rc == 0
        assert [json.loads(x)["custom_id"] for x in errs.read_text().splitlines()] == ["c"]
        rc, out, _ = await run(cli(srv, "batch", "results", bid), capsys)  # to stdout
        assert rc == 0 and sorted(json.loads(x)["custom_id"] for x in out.splitlines()) == \
            ["a", "b"]


async def test_watch_follows_a_running_batch_to_its_end(keyed, capsys):
    async with running(keyed) as srv:
        srv.executor.hold()
        f = await srv.client(KEY).files.create(
            file=("in.jsonl", jsonl([chat_line(f"r{i}") for i in range(4)])), purpose="batch")
        b = await srv.client(KEY).batches.create(input_file_id=f.id, endpoint="/v1/chat/"
                                                 "completions", completion_window="24h")
        await poll(srv.client(KEY), b.id, lambda x: x.status == "in_progress")
        watching = asyncio.create_task(run(cli(srv, "batch", "watch", b.id, "--interval", "0.05"),
                                           capsys))
        await asyncio.sleep(0.3)
        assert not watching.done()
        rc, _, early = await run(cli(srv, "batch", "results", b.id), capsys)
        assert rc == 1 and "is in_progress" in early  # no files before it ends
        srv.executor.release(4)
        rc, _, err = await asyncio.wait_for(watching, 30)
        err = early + err  # the watch's output so far was captured with the results' output
        assert rc == 0 and "planned done" in err and "4 completed, 0 failed" in err


async def test_watch_exits_1_for_a_cancelled_batch_and_errors_are_one_line(keyed, capsys):
    async with running(keyed) as srv:
        srv.executor.hold()
        f = await srv.client(KEY).files.create(file=("in.jsonl", jsonl([chat_line("a")])),
                                               purpose="batch")
        b = await srv.client(KEY).batches.create(input_file_id=f.id,
                                                 endpoint="/v1/chat/completions",
                                                 completion_window="24h")
        await srv.client(KEY).batches.cancel(b.id)
        rc, _, err = await run(cli(srv, "batch", "watch", b.id, "--interval", "0.05"), capsys)
        assert rc == 1 and "cancelled" in err
        rc, _, err = await run(cli(srv, "batch", "watch", b.id, key="sk-wrong-key-0000"), capsys)
        assert rc == 1 and err.startswith("samullm: 401")
        rc, _, err = await run(cli(srv, "batch", "watch", "batch_nope"), capsys)
        assert rc == 1 and err.startswith("samullm: 404")
    rc, _, err = await run(["batch", "watch", "batch_x", "--base-url", srv.url + "/v1"], capsys)
    assert rc == 1 and "cannot reach the gateway" in err


async def test_the_console_script_as_a_subprocess(keyed, tmp_path):
    async with running(keyed) as srv:
        client = srv.client(KEY)
        f = await client.files.create(file=("in.jsonl", jsonl([chat_line("a"), chat_line("b")])),
                                      purpose="batch")
        b = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
        await poll(client, b.id)
        dest = tmp_path / "out.jsonl"
        env = {**os.environ, "OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": f"{srv.url}/v1"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli.main", "batch", "results", b.id, "-o", str(dest),
            cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        assert len(dest.read_text().splitlines()) == 2
