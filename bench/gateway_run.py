"""A bench's gateway: a fresh `samullm serve` in a subprocess with its spare engines ready, a batch
run to its end through the official `openai` SDK, its output checked (every custom_id once, every
answer as long as asked), the executor's events read back from the gateway's JSON log, and the
options of every gateway bench for how long a batch may take and when to start one."""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from bench.demo_setup import CHAT, REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class GatewayRun:
    strategy: str
    makespan_s: float
    requests: int
    events: list[dict] = field(default_factory=list)

    def first(self, kind: str) -> dict | None:
        return next((e for e in self.events if e["event"] == kind), None)

    @property
    def predicted_s(self) -> float | None:
        plan = self.first("plan")
        return plan["predicted_makespan_s"] if plan else None

    @property
    def lower_bound_s(self) -> float | None:
        """The first plan's lower bound on the makespan (`scheduler.bounds`)."""
        plan = self.first("plan")
        return plan.get("lower_bound_s") if plan else None


def executor_events(log_path: Path) -> list[dict]:
    """The executor's events from the gateway's JSON log (`<kind> <dict repr>` messages)."""
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("logger") != "runtime.executor.executor" or " {" not in rec.get("msg", ""):
            continue
        kind, _, rest = rec["msg"].partition(" ")
        try:
            data = ast.literal_eval(rest)
        except (ValueError, SyntaxError):
            continue
        if isinstance(data, dict):
            out.append({"event": kind, "t": rec["t"], **data})
    return out


@contextlib.contextmanager
def serving(cfg_path: Path, root: Path, tag: str, strategy: str, api_key: str = "unused",
            state: Path | None = None) -> Iterator[tuple[Any, Path]]:
    """A fresh `samullm serve` with its spare engine processes ready; yields (OpenAI client, its log
    path), and stops it (SIGTERM) on exit. A fresh state dir per run: no batch of an earlier
    (interrupted) run resumes in front of this one, and every run starts from the same length
    prior; the profiles are shared. `state`: the caller's state dir instead (e.g. one without
    profiles, `bench.fresh`)."""
    from openai import OpenAI

    port = free_port()
    log_path = root / "logs" / f"gateway-{tag}-{strategy}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = Path(tempfile.mkdtemp(prefix=f"state-{tag}-{strategy}-", dir=root / "runs"))
        (state / "profiles").symlink_to(root / "state" / "profiles")
    cmd = [sys.executable, "-m", "cli.main", "serve", "--config", str(cfg_path),
           "--port", str(port), "--state-dir", str(state)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.models.list()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"gateway did not start; see {log_path}")
                time.sleep(0.3)
        ready_s, import_s = wait_spares(port, deadline=time.monotonic() + 120)
        print(f"  gateway ready: spare engine processes ready after {ready_s:.1f} s"
              f" (the zygote's import: {import_s} CPU s)", flush=True)
        yield client, log_path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_to_end(client: Any, file_id: str, metadata: dict | None, timeout_s: float, what: str) -> Any:
    """Create a batch of the uploaded file and poll it until it is completed (else raise)."""
    t0 = time.monotonic()
    batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h",
                                  metadata=metadata)
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        if time.monotonic() - t0 > timeout_s:
            client.batches.cancel(batch.id)
            raise RuntimeError(f"{what}: batch not done after {timeout_s} s")
        time.sleep(0.25)
        batch = client.batches.retrieve(batch.id)
    if batch.status != "completed":
        raise RuntimeError(f"{what}: batch {batch.status}: {batch.errors}")
    return batch


def run_gateway(cfg_path: Path, root: Path, input_path: Path, strategy: str, expected: list[dict],
                timeout_s: float, tag: str) -> GatewayRun:
    with serving(cfg_path, root, tag, strategy) as (client, log_path):
        with open(input_path, "rb") as f:
            fobj = client.files.create(file=f, purpose="batch")
        t0 = time.monotonic()
        batch = run_to_end(client, fobj.id, {"strategy": strategy}, timeout_s, strategy)
        makespan = time.monotonic() - t0
        check_output(client.files.content(batch.output_file_id).text, expected, strategy)
    return GatewayRun(strategy, makespan, len(expected), executor_events(log_path))


def wait_spares(port: int, deadline: float) -> tuple[float, float | None]:
    """Wait until the gateway's spare engine processes (runtime.engines.spares) are ready, as they are on a
    gateway that has been up a while; seconds waited. A one-off CLI like run_batch has none: the
    README reports what this is worth (engine start with and without a spare). Returns the seconds
    waited and the CPU seconds of one import (what the planner charges a start without a spare)."""
    import urllib.request

    t0 = time.monotonic()
    spares = None
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            spares = json.loads(r.read()).get("spare_engines")
        if spares is None or spares["ready"] >= spares["target"]:
            break
        time.sleep(0.2)
    return time.monotonic() - t0, (spares or {}).get("import_s")


def check_output(text: str, expected: list[dict], what: str) -> None:
    """Every custom_id exactly once, status 200, exactly max_tokens generated (same work everywhere)."""
    want = {r["custom_id"]: r["body"]["max_tokens"] for r in expected}
    seen = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        resp = rec.get("response") or {}
        if resp.get("status_code") != 200:
            raise RuntimeError(f"{what}: {rec['custom_id']} failed: {rec.get('error') or resp}")
        seen[rec["custom_id"]] = resp["body"]["usage"]["completion_tokens"]
    if seen != want:
        missing = set(want) - set(seen)
        wrong = [k for k in want if k in seen and seen[k] != want[k]]
        raise RuntimeError(f"{what}: output mismatch: {len(missing)} missing, "
                           f"{len(wrong)} with another length (e.g. {wrong[:3]})")


def wait_quiet(max_load: float, max_wait_s: float) -> float:
    """Wait until the 1-min load average is below `max_load` (at most `max_wait_s`); returns it."""
    t0 = time.monotonic()
    while True:
        load = os.getloadavg()[0]
        if load < max_load or time.monotonic() - t0 > max_wait_s:
            return load
        print(f"load average {load:.2f} >= {max_load}: waiting", flush=True)
        time.sleep(20)


def add_wait_args(ap: argparse.ArgumentParser, timeout_s: float = 300) -> None:
    """The options of every gateway bench for how long a batch may take and when to start one."""
    ap.add_argument("--timeout", type=float, default=timeout_s, help="per batch, seconds")
    ap.add_argument("--max-load", type=float, default=99.0,
                    help="wait (up to --max-wait) until the 1-min load average is below this")
    ap.add_argument("--max-wait", type=float, default=1800)
