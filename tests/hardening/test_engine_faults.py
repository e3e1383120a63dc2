"""SIGKILL of a real `samullm serve` (real vLLM engines, spare processes) in the middle of a batch:
the engines and spares it started go down with it, and after a restart the batch completes with each
custom_id exactly once, without re-running what the journal already held; and nothing of the killed
engines stays in /dev/shm (vLLM's segments, Python's semaphores: they hold RAM until unlinked)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import requests

from runtime.engines.procs import group_pids, proc_stats, tree_pids
from runtime.engines.shm import shm_names, still_present
from tests.hardening.test_faults import CHAT, REPO, Proc, free_port, get, lines, wait_for

pytestmark = pytest.mark.engine


def _config(path: Path, state: Path, port: int, model_dir: Path) -> Path:
    path.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nstate_dir = "{state}"\n'
        '[devices]\nkind = "cpu"\nids = [0, 1]\ncpu_kvcache_gib = 0.25\n'
        f'[[models]]\nname = "tiny-a"\npath = "{model_dir / "tiny-a"}"\nmax_model_len = 1024\n'
        'max_num_seqs = 32\nmax_num_batched_tokens = 1024\nengine_args = {enforce_eager = true}\n')
    return path


def _resource_trackers(groups: set[int]) -> list[int]:
    """Python's multiprocessing resource trackers in `groups`: on SIGTERM they, not vLLM, unlink the
    engine's psm_* segments and sem.mp-* semaphores."""
    out = []
    for pid in (p for g in groups for p in group_pids(g)):
        try:
            if b"multiprocessing.resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            pass
    return out


def _children_groups(pid: int) -> set[int]:
    """Process groups of `pid`'s descendants (engine and spare guards, the zygote and the spares
    it forked, the planner)."""
    tree = set(tree_pids(pid)) - {pid}
    return {group for p, _, _, group in proc_stats() if p in tree}


@pytest.mark.timeout(600)
def test_sigkill_real_gateway_mid_batch_then_restart(tiny_model_dir: Path, tmp_path: Path):
    port = free_port()
    cfg = _config(tmp_path / "c.toml", tmp_path / "state", port, tiny_model_dir)
    log = tmp_path / "serve.log"
    argv = [str(REPO / ".venv" / "bin" / "samullm"), "serve", "--config", str(cfg)]
    ups = [f"k{i}" for i in range(400)]
    # dependents (issue 13) of requests journaled before the kill (k0-k19: their text then comes
    # from the journal) and of requests run after the restart (k380-k399)
    deps = {f"d{i}": f"k{i}" for i in [*range(20), *range(380, 400)]}
    ids = ups + list(deps)
    n = len(ids)
    body = b"".join(json.dumps({"custom_id": c, "method": "POST", "url": CHAT, "body": {
        "model": "tiny-a", "messages": [{"role": "user", "content": f"tell me about {c}"}],
        "max_tokens": 96, "ignore_eos": True}}).encode() + b"\n" for c in ups)
    body += b"".join(json.dumps({"custom_id": d, "method": "POST", "url": CHAT, "depends_on": [u],
                                 "body": {"model": "tiny-a", "max_tokens": 4, "messages": [
                                     {"role": "user", "content": f"summarise: {{{{{u}}}}}"}]}}
                                ).encode() + b"\n" for d, u in deps.items())
    proc = Proc(argv, port, log)
    try:
        f = requests.post(f"{proc.url}/v1/files", files={"file": ("in.jsonl", body)},
                          data={"purpose": "batch"}).json()
        bid = requests.post(f"{proc.url}/v1/batches", json={
            "input_file_id": f["id"], "endpoint": CHAT, "completion_window": "24h"}).json()["id"]
        b = wait_for(proc.url, bid, lambda x: x["request_counts"]["completed"] > 0, 300)
        groups = _children_groups(proc.p.pid)
        assert any(group_pids(g) for g in groups)
        engines = groups - {proc.p.pid}  # the gateway's own group: its planner's pool
        shm = shm_names([p for g in engines for p in group_pids(g)])
        assert shm  # vLLM's message queues (psm_*) and semaphores (sem.mp-*), at least
        b = get(proc.url, bid)
        done_before = b["request_counts"]["completed"]
        # the engines' own cleanup is lost too, as when the guard's grace period runs out (it then
        # SIGKILLs the trackers with the rest) or the OOM killer picks one
        trackers = _resource_trackers(engines)
        assert trackers
        for pid in trackers:
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        assert b["status"] == "in_progress" and done_before < n, b
        deadline = time.monotonic() + 60  # the guards take their groups down (PDEATHSIG)
        while any(group_pids(g) for g in groups) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for g in groups for p in group_pids(g)], "orphans after SIGKILL"
        assert not still_present(shm), "the guards left these in /dev/shm"
        log.write_text("")  # the restarted gateway's log only
        proc = Proc(argv, port, log)
        done = wait_for(proc.url, bid, lambda x: x["status"] in (
            "completed", "failed", "expired", "cancelled"), 300)
        assert done["status"] == "completed", done
        out, err = lines(proc.url, done["output_file_id"]), lines(proc.url, done["error_file_id"])
        got = [x["custom_id"] for x in out + err]
        assert sorted(got) == sorted(ids) and len(got) == len(set(got))
        assert not err and all(x["response"]["status_code"] == 200 for x in out)
        # each dependent's prompt held its upstream's 96 generated tokens
        assert all(x["response"]["body"]["usage"]["prompt_tokens"] > 96
                   for x in out if x["custom_id"] in deps)
        raw = requests.get(f"{proc.url}/v1/files/{done['output_file_id']}/content").content
        # what users do (the SDK decodes UTF-8): line separators in generated text stay escaped
        assert len(raw.decode("utf-8").splitlines()) == n
        assert done["request_counts"] == {"total": n, "completed": n, "failed": 0}
        resubmitted = [int(m) for m in re.findall(r"batch_submitted .*?'requests': (\d+)",
                                                  log.read_text())]
        assert resubmitted and resubmitted[0] <= n - done_before  # the journal's were not re-run
        assert not still_present(shm)
    finally:
        proc.kill()
