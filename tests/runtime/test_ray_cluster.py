"""Engines on a real Ray cluster (`[cluster] backend = "ray"`): `ray.cluster_utils.Cluster` with two
nodes of one core each (shared by these tests: starting one costs seconds), real vLLM CPU engines of
the tiny test models, `samullm serve` as a subprocess driven through the official openai SDK.

- a pooled two-model batch runs one engine per node;
- a node removed mid-run: the batch still completes, each custom_id once;
- a SIGKILLed gateway with engines on the cluster leaves no placement group or engine process
  behind once restarted (and the restarted one removes a group its predecessor left).

The pool mapping and the node-loss path with test doubles: `test_cluster_pool.py`."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from runtime.engines.procs import group_pids
from runtime.engines.ray_cluster import CORES_LABEL, gateway_prefix, owned_groups
from tests.hardening.test_faults import REPO, Proc, free_port, lines

pytestmark = [pytest.mark.engine, pytest.mark.ray]
SERVE = [str(REPO / ".venv" / "bin" / "samullm"), "serve", "--config"]
MODELS = ("tiny-a", "tiny-b")


def _node_args(core: int) -> dict[str, Any]:
    return {"num_cpus": 1, "object_store_memory": 80 << 20, "labels": {CORES_LABEL: str(core)}}


class TwoNodes:
    """The session's cluster: a head node on core 0 and a worker node on core 1 (re-added after a
    test removed it)."""

    def __init__(self) -> None:
        import ray
        from ray.cluster_utils import Cluster

        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            pytest.skip("two cores needed for a two-node cluster")
        self.cores = cores[:2]
        self.cluster = Cluster(initialize_head=True, head_node_args=_node_args(self.cores[0]))
        self.worker = self.cluster.add_node(**_node_args(self.cores[1]))
        ray.init(address=self.cluster.address, namespace="samullm", log_to_driver=False)
        self.address = self.cluster.address

    def ensure_worker(self) -> None:
        import ray

        if not any(n["Alive"] and n["Labels"].get(CORES_LABEL) == str(self.cores[1])
                   for n in ray.nodes()):
            self.worker = self.cluster.add_node(**_node_args(self.cores[1]))

    def close(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


@pytest.fixture(scope="session")
def two_nodes() -> Iterator[TwoNodes]:
    nodes = TwoNodes()
    try:
        yield nodes
    finally:
        nodes.close()


@pytest.fixture
def cluster(two_nodes: TwoNodes) -> TwoNodes:
    two_nodes.ensure_worker()
    return two_nodes


def _config(tmp_path: Path, port: int, address: str, model_dir: Path) -> Path:
    models = "".join(
        f'[[models]]\nname = "{m}"\npath = "{model_dir / m}"\nmax_model_len = 1024\n'
        'max_num_seqs = 32\nmax_num_batched_tokens = 1024\nengine_args = {enforce_eager = true}\n'
        for m in MODELS)
    path = tmp_path / "ray.toml"
    path.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nstate_dir = "{tmp_path / "state"}"\n'
        '[devices]\nkind = "cpu"\ncpu_kvcache_gib = 0.25\nengine_linger_s = 0\n'
        '[limits]\nmax_retries = 3\n'
        f'[cluster]\nbackend = "ray"\naddress = "{address}"\nnode_poll_s = 0.5\n' + models)
    return path


def _requests(n: int, max_tokens: int) -> bytes:
    return b"".join(json.dumps({"custom_id": f"{m}-{i}", "method": "POST",
                                "url": "/v1/chat/completions", "body": {
                                    "model": m, "max_tokens": max_tokens, "ignore_eos": True,
                                    "messages": [{"role": "user", "content": f"say {i} to {m}"}]}}
                               ).encode() + b"\n" for i in range(n) for m in MODELS)


def _events(url: str, bid: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = ""
    while True:
        page = requests.get(f"{url}/v1/batches/{bid}/events",
                            params={"limit": 1000, **({"after": after} if after else {})}).json()
        out += [{"event": e["type"], **e["data"]} for e in page["data"]]
        if not page["has_more"]:
            return out
        after = page["last_id"]


def _wait(pred, timeout_s: float, what: str, step_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(step_s)


def _check_once(client: Any, url: str, bid: str, n: int) -> dict[str, Any]:
    b = _wait(lambda: (x := client.batches.retrieve(bid)).status in (
        "completed", "failed", "expired", "cancelled") and x, 600, "the batch to end", 1.0)
    assert b.status == "completed", b
    out = lines(url, b.output_file_id)
    err = lines(url, b.error_file_id)
    got = [x["custom_id"] for x in out + err]
    assert len(got) == n and len(set(got)) == n, "a custom_id missing or twice"
    assert not err, err[:3]
    return {"batch": b, "out": out}


def _live_groups(prefix: str) -> list[str]:
    return owned_groups(prefix)


def _gateway(cluster: TwoNodes, model_dir: Path, tmp_path: Path) -> tuple[list[str], Proc, str]:
    """A `samullm serve` on the cluster: (its command, the process, its groups' name prefix)."""
    port = free_port()
    argv = [*SERVE, str(_config(tmp_path, port, cluster.address, model_dir))]
    return argv, Proc(argv, port, tmp_path / "serve.log"), gateway_prefix(tmp_path / "state")


@pytest.mark.timeout(900)
def test_pooled_batch_runs_one_engine_per_node(cluster: TwoNodes, tiny_model_dir: Path,
                                               tmp_path: Path) -> None:
    from openai import OpenAI
    from ray.util.placement_group import placement_group_table

    before = set(os.listdir("/dev/shm"))
    _, proc, prefix = _gateway(cluster, tiny_model_dir, tmp_path)
    try:
        health = requests.get(f"{proc.url}/health").json()
        nodes = health["nodes"]
        # ids in order of the nodes' own cores (both nodes share this machine's address)
        assert [(n["devices"], n["local_devices"]) for n in sorted(
            nodes, key=lambda n: n["devices"])] == [([0], [cluster.cores[0]]),
                                                   ([1], [cluster.cores[1]])]
        metrics = requests.get(f"{proc.url}/metrics").text
        assert "samullm_cluster_nodes 2.0" in metrics
        assert len(re.findall(r"^samullm_node_devices\{.*\} 1\.0$", metrics, re.M)) == 2
        client = OpenAI(base_url=f"{proc.url}/v1", api_key="unused")
        f = client.files.create(file=("in.jsonl", _requests(24, 48)), purpose="batch")
        bid = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                    completion_window="24h").id

        def both_placed() -> list[dict] | None:
            groups = [g for g in placement_group_table().values()
                      if g["name"].startswith(prefix) and g["state"] == "CREATED"]
            return groups if len(groups) == 2 else None
        groups = _wait(both_placed, 300, "an engine on each node")
        placed_on = {n for g in groups for n in g.get("bundles_to_node_id", {}).values()}
        assert placed_on == {n["node"] for n in nodes}  # one group on each node
        done = _check_once(client, proc.url, bid, 48)
        assert all(x["response"]["body"]["usage"]["completion_tokens"] == 48 for x in done["out"])
        started = [e for e in _events(proc.url, bid) if e["event"] == "engine_started"]
        by_model = {e["model"]: tuple(e["devices"]) for e in started}
        assert set(by_model) == set(MODELS) and set(by_model.values()) == {(0,), (1,)}
        _wait(lambda: not _live_groups(prefix), 60, "the engines' groups to go (linger 0)")
        assert (tmp_path / "state" / "start_times-ray.json").exists()
        # a stopped engine leaves nothing in /dev/shm (vLLM's message queues are its psm_ files;
        # the semaphores, sem.mp-*, could also be the gateway's own, which still runs)
        engine_pids = [e["pid"] for e in started]
        _wait(lambda: not any(group_pids(p) for p in engine_pids), 60, "the engines' processes")
        assert not [n for n in set(os.listdir("/dev/shm")) - before if n.startswith("psm_")]
    finally:
        proc.p.send_signal(signal.SIGTERM)
        proc.p.wait(60)


@pytest.mark.timeout(900)
def test_sigkilled_gateway_leaves_nothing_on_the_cluster(cluster: TwoNodes, tiny_model_dir: Path,
                                                         tmp_path: Path) -> None:
    from openai import OpenAI
    from ray.util.placement_group import placement_group

    argv, proc, prefix = _gateway(cluster, tiny_model_dir, tmp_path)
    client = OpenAI(base_url=f"{proc.url}/v1", api_key="unused")
    try:
        f = client.files.create(file=("in.jsonl", _requests(60, 96)), purpose="batch")
        bid = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                    completion_window="24h").id
        _wait(lambda: client.batches.retrieve(bid).request_counts.completed > 0, 300,
              "first results")
        engines = [e["pid"] for e in _events(proc.url, bid) if e["event"] == "engine_started"]
        assert engines and all(group_pids(pid) for pid in engines)
        assert _live_groups(prefix)
        # a group Ray would not remove by itself (detached), as a gateway of an older make left
        leftover = placement_group([{"CPU": 0.01}], name=f"{prefix}leftover", lifetime="detached")
        proc.kill()
        _wait(lambda: not any(group_pids(pid) for pid in engines), 90,
              "the engines to go down with their actors")
        proc = Proc(argv, int(proc.url.rsplit(":", 1)[1]), proc.log)
        assert f"{prefix}leftover" not in _live_groups(prefix)
        del leftover
        _check_once(client, proc.url, bid, 120)
        _wait(lambda: not _live_groups(prefix), 60, "every placement group of the gateway gone")
        assert re.search(r"removed \d+ placement groups an earlier gateway left: .*leftover",
                         proc.log.read_text())
    finally:
        proc.kill()
    _wait(lambda: not _live_groups(prefix), 60, "the groups of the last gateway gone")


@pytest.mark.timeout(900)
def test_a_node_removed_mid_run_is_survived(cluster: TwoNodes, tiny_model_dir: Path,
                                            tmp_path: Path) -> None:
    from openai import OpenAI

    _, proc, prefix = _gateway(cluster, tiny_model_dir, tmp_path)
    try:
        client = OpenAI(base_url=f"{proc.url}/v1", api_key="unused")
        # long enough that the batch still runs when the node is gone (with 96 tokens each a
        # model's 80 were done 1.4 s after its engine started, before the node's removal showed;
        # with 384 it failed in two of ~10 runs since engine starts take 4 s instead of 15)
        f = client.files.create(file=("in.jsonl", _requests(200, 384)), purpose="batch")
        bid = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                    completion_window="24h").id

        def both_serving() -> bool:
            started = [e for e in _events(proc.url, bid) if e["event"] == "engine_started"]
            return len(started) >= 2 and client.batches.retrieve(bid).request_counts.completed > 4
        _wait(both_serving, 300, "an engine serving on each node", 0.5)
        cluster.cluster.remove_node(cluster.worker)
        assert client.batches.retrieve(bid).request_counts.completed < 300  # still running
        done = _check_once(client, proc.url, bid, 400)
        events = _events(proc.url, bid)
        kinds = [e["event"] for e in events]
        assert "node_left" in kinds and "engine_failed" in kinds, [
            (e["event"], e.get("time"), e.get("model")) for e in events]
        assert "engine_start_failed" not in kinds
        failed = [e for e in events if e["event"] == "engine_failed"]
        assert all("left the cluster" in e["message"] or "exited" in e["message"]
                   for e in failed)
        assert all(x["response"]["status_code"] == 200 for x in done["out"])
        health = requests.get(f"{proc.url}/health").json()
        assert len(health["nodes"]) == 1
        _wait(lambda: not _live_groups(prefix), 60, "the engines' groups to go")
        # a node joining: the pool grows by ids never used before (the lost node's stay unused)
        gone = {d for n in _events(proc.url, bid) if n["event"] == "node_left"
                for d in n["devices"]}
        cluster.ensure_worker()
        nodes = _wait(lambda: len(n := requests.get(f"{proc.url}/health").json()["nodes"]) == 2
                      and n, 60, "the new node in /health")
        ids = {d for n in nodes for d in n["devices"]}
        assert len(ids) == 2 and not ids & gone
    finally:
        proc.p.send_signal(signal.SIGTERM)
        proc.p.wait(60)
