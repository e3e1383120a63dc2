"""Faults: SIGKILL of the gateway process at random points of a batch's life, a full disk while
writing output, graceful shutdown of `samullm serve` on SIGTERM.

Kill trials run the real gateway (`create_app` + `web.run_app`) as a subprocess with a paced
engine-free executor (`serve_double.py`), so each trial costs seconds; the real-engine variant lives
in `test_engine_faults.py`. After each restart every batch must reach a terminal state and its output
and error files must hold each custom_id exactly once."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.hardening.conftest import fill_disk

REPO = Path(__file__).resolve().parents[2]
TERMINAL = {"completed", "failed", "expired", "cancelled"}
CHAT = "/v1/chat/completions"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, state: Path, port: int, models: str | None = None) -> Path:
    models = models or ('[[models]]\nname = "tiny-a"\narch = {num_layers = 2, hidden_size = 128, '
                        'num_heads = 2, num_kv_heads = 1, intermediate_size = 512, '
                        'vocab_size = 2048}\nmax_model_len = 1024\n')
    path.write_text(f'[server]\nhost = "127.0.0.1"\nport = {port}\nstate_dir = "{state}"\n'
                    f'[limits]\nmax_requests_per_batch = 50000\n{models}')
    return path


class Proc:
    """A gateway subprocess; `url` answers once /health does."""

    def __init__(self, argv: list[str], port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        self.p = subprocess.Popen(argv, cwd=REPO, env=env, stdout=open(log, "ab"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:  # refused, or slow to answer on a busy machine
                pass
            if self.p.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"gateway did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(30)


def double(cfg: Path, port: int, log: Path) -> Proc:
    return Proc([sys.executable, "-m", "tests.hardening.serve_double", str(cfg)], port, log)


def jsonl(ids: list[str], text: str = "hello") -> bytes:
    return b"".join(json.dumps({"custom_id": c, "method": "POST", "url": CHAT, "body": {
        "model": "tiny-a", "messages": [{"role": "user", "content": text}], "max_tokens": 4}}
    ).encode() + b"\n" for c in ids)


def create(url: str, ids: list[str], text: str = "hello") -> str:
    f = requests.post(f"{url}/v1/files", files={"file": ("in.jsonl", jsonl(ids, text))},
                      data={"purpose": "batch"}).json()
    b = requests.post(f"{url}/v1/batches", json={"input_file_id": f["id"], "endpoint": CHAT,
                                                 "completion_window": "24h"})
    assert b.status_code == 200, b.text
    return b.json()["id"]


def get(url: str, bid: str) -> dict:
    return requests.get(f"{url}/v1/batches/{bid}", timeout=5).json()


def wait_for(url: str, bid: str, pred, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        b = get(url, bid)
        if pred(b):
            return b
        assert time.monotonic() < deadline, f"batch stuck: {b['status']} {b['request_counts']}"
        time.sleep(0.005)


def lines(url: str, fid: str | None) -> list[dict]:
    if fid is None:
        return []
    r = requests.get(f"{url}/v1/files/{fid}/content")
    assert r.status_code == 200
    # UTF-8, as the SDK (httpx) decodes it: requests' `.text` guesses a charset for
    # application/octet-stream, and a wrong guess (latin-1) turns UTF-8 bytes into U+0085
    return [json.loads(x) for x in r.content.decode("utf-8").split("\n") if x.strip()]


def check_exactly_once(url: str, bid: str, ids: list[str]) -> dict:
    b = wait_for(url, bid, lambda x: x["status"] in TERMINAL)
    assert b["status"] == "completed", b
    out, err = lines(url, b["output_file_id"]), lines(url, b["error_file_id"])
    got = [x["custom_id"] for x in out + err]
    assert sorted(got) == sorted(ids) and len(got) == len(set(got)), bid
    assert b["request_counts"] == {"total": len(ids), "completed": len(out), "failed": len(err)}
    return b


# (phase, batch size): validating needs a file big enough to be caught validating, finalizing one
# big enough to be caught writing its output.
TRIALS = [("validating", 6_000), ("validating", 6_000), ("validating", 4_000),
          ("in_progress", 300), ("in_progress", 300), ("in_progress", 500), ("in_progress", 200),
          ("finalizing", 8_000), ("finalizing", 8_000), ("finalizing", 10_000)]


@pytest.mark.timeout(300)
def test_sigkill_at_random_points_then_restart(tmp_path):
    rng = random.Random(7)
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", tmp_path / "state", port)
    log = tmp_path / "gateway.log"
    proc = double(cfg, port, log)
    batches: dict[str, list[str]] = {}
    hit: list[str] = []
    try:
        trials = list(TRIALS)
        trial = 0
        while trial < len(trials):
            phase, n = trials[trial]
            ids = [f"t{trial}-{i}" for i in range(n)]
            bid = create(proc.url, ids, "SLOW" if phase == "in_progress" else "hello")
            batches[bid] = ids
            if phase == "in_progress":
                b = wait_for(proc.url, bid, lambda x: x["request_counts"]["completed"] > 0)
                time.sleep(rng.uniform(0, 0.3))
            elif phase == "finalizing":
                b = wait_for(proc.url, bid, lambda x: x["status"] in ({"finalizing"} | TERMINAL))
            else:
                time.sleep(rng.uniform(0, 0.05))
            b = get(proc.url, bid)
            proc.kill()
            hit.append(b["status"])
            proc = double(cfg, port, log)
            check_exactly_once(proc.url, bid, ids)
            trial += 1
            if trial == len(trials) and len(trials) < len(TRIALS) + 6:
                # a quick machine can finish a phase before the kill lands: try the phases no
                # kill has hit yet again, with twice the batch (at most 6 extra trials)
                trials += [(ph, 2 * m) for ph, m in TRIALS if ph not in hit][:3]
        for old, old_ids in batches.items():  # and every earlier batch is still intact
            b = get(proc.url, old)
            assert b["status"] == "completed" and b["request_counts"]["total"] == len(old_ids)
        db = sqlite3.connect(tmp_path / "state" / "samullm.db")
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.close()
    finally:
        proc.kill()
    # the kills landed in each phase of the batch's life at least once
    assert {"validating", "in_progress", "finalizing"} <= set(hit), hit
    assert not list((tmp_path / "state" / "files").glob("*.tmp"))  # torn writes swept


@pytest.mark.timeout(120)
def test_disk_full_while_writing_output(tmp_path, small_disk):
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", small_disk / "state", port)
    log = tmp_path / "gateway.log"
    proc = double(cfg, port, log)
    try:
        ids = [f"d{i}" for i in range(3_000)]
        bid = create(proc.url, ids)
        wait_for(proc.url, bid, lambda x: x["request_counts"]["completed"] > 0)
        filler = small_disk / "filler"
        fill_disk(filler)  # every free byte, while the batch runs
        time.sleep(3)  # the batch runs into ENOSPC (journal or output file)
        b = get(proc.url, bid)
        assert b["status"] in ("in_progress", "finalizing"), b  # paused, not falsely completed
        assert requests.get(f"{proc.url}/health").status_code == 200  # still answering
        assert requests.get(f"{proc.url}/v1/batches").status_code == 200
        up = requests.post(f"{proc.url}/v1/files", files={"file": ("x.jsonl", jsonl(["z"] * 9000))},
                           data={"purpose": "batch"})
        assert up.status_code == 507, up.text
        assert up.json()["error"]["code"] == "insufficient_storage"
        assert "No space left on device" in log.read_text()  # the clear error, in the log
        filler.unlink()  # space again: a restart resumes the batch and loses nothing
        proc.kill()
        proc = double(cfg, port, log)
        check_exactly_once(proc.url, bid, ids)
        db = sqlite3.connect(small_disk / "state" / "samullm.db")
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.close()
    finally:
        proc.kill()


@pytest.mark.timeout(120)
def test_samullm_serve_sigterm_is_graceful(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", tmp_path / "state", port)
    log = tmp_path / "serve.log"
    argv = [str(REPO / ".venv" / "bin" / "samullm"), "serve", "--config", str(cfg)]
    proc = Proc(argv, port, log)
    fid = requests.post(f"{proc.url}/v1/files", files={"file": ("in.jsonl", jsonl(["a"]))},
                        data={"purpose": "batch"}).json()["id"]
    proc.p.send_signal(signal.SIGTERM)
    assert proc.p.wait(30) == 0  # a clean exit, well before any SIGKILL would be needed
    out = log.read_text()
    assert f"state dir: {(tmp_path / 'state').resolve()}" in out
    assert "model tiny-a: plan only" in out and "devices: cpu" in out
    with pytest.raises(requests.ConnectionError):  # no longer accepting
        requests.get(f"{proc.url}/health", timeout=2)
    db = sqlite3.connect(tmp_path / "state" / "samullm.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT id FROM files").fetchall() == [(fid,)]
    db.close()


@pytest.mark.timeout(180)
def test_serve_needs_the_state_dir_lock_and_its_port_before_resuming(tmp_path):
    """Issue 12, item 2: a second `samullm serve` on a state dir in use exits naming the holder's
    pid; a `serve` whose port is taken exits before it resumes a batch (or starts a spare)."""
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", tmp_path / "state", port)
    log = tmp_path / "gateway.log"
    proc = double(cfg, port, log)
    serve = [str(REPO / ".venv" / "bin" / "samullm"), "serve", "--config", str(cfg)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    try:
        bid = create(proc.url, [f"s{i}" for i in range(4000)], text="SLOW")
        wait_for(proc.url, bid, lambda x: x["request_counts"]["completed"] > 0)
        second = subprocess.run([*serve, "--port", str(free_port())], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr
        assert f"pid {proc.p.pid}" in second.stderr and "resuming" not in second.stderr
    finally:
        proc.kill()  # the batch stays in_progress in the database
    journal = tmp_path / "state" / "journals" / f"{bid}.jsonl"
    before = journal.read_bytes()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        third = subprocess.run(serve, cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=60)
    assert third.returncode == 2 and "cannot listen" in third.stderr, third.stderr
    assert "resuming" not in third.stdout + third.stderr and "spare" not in third.stdout
    assert journal.read_bytes() == before
    db = sqlite3.connect(tmp_path / "state" / "samullm.db")
    assert db.execute("SELECT status FROM batches WHERE id = ?", (bid,)).fetchone()[0] == \
        "in_progress"
    db.close()
