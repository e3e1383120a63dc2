"""A cluster's nodes as the device pool, and a lost node as engine deaths (fast: no Ray, test doubles).

The real thing (Ray, vLLM engines on a two-node cluster) is `tests/runtime/test_ray_cluster.py`."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.metrics import GatewayMetrics
from runtime.config import ClusterConfig, ConfigError, parse_config
from runtime.engines.devices import ClusterLayout, Node, discover_pool, planning_pool
from runtime.engines.engine import EngineSpec, NodeLost
from runtime.engines.ray_cluster import gateway_prefix, node_from_ray, parse_cores
from runtime.executor.executor import PoolExecutor
from scheduler.placement import place

from .clocks import ManualClock
from .fakes import FakeLauncher
from .executor_kit import Sink, items, make_cfg

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]


def ray_cfg(tmp_path: Path, **cluster):
    return parse_config({"server": {"state_dir": str(tmp_path / "state")},
                         "devices": {"kind": "cpu", "cpu_kvcache_gib": 0.25},
                         "cluster": {"backend": "ray", **cluster}})


def test_each_node_is_one_group_with_ids_of_its_own(tmp_path: Path) -> None:
    cfg = ray_cfg(tmp_path)
    layout = ClusterLayout()
    a, b = Node("a", "10.0.0.1", "cpu", (0, 1, 2, 3)), Node("b", "10.0.0.2", "cpu", (4, 5))
    first = layout.update([b, a], cfg)
    pool = first.pool
    assert pool.kind == "cpu" and pool.ids == (0, 1, 2, 3, 4, 5)
    assert pool.groups == ((0, 1, 2, 3), (4, 5))
    assert pool.max_threads == 4 and discover_pool(cfg, layout) == pool
    assert [p.node.node_id for p in first.joined] == ["a", "b"] and not first.left
    # a TP group stays on one node (a group); DP replicas may sit on both
    plans = place([("m", 2, 3)], pool)
    assert plans is not None and all(set(r) <= set(g) for r in plans[0].replicas()
                                     for g in pool.groups if set(r) & set(g))
    assert {tuple(sorted(r)) for r in plans[0].replicas()} >= {(4, 5)}
    # pool ids -> the node's own cores
    placed = layout.locate((4, 5))
    assert placed is not None and placed.node.node_id == "b" and placed.local((5,)) == (5,)
    assert layout.locate((3, 4)) is None  # a replica never spans two nodes
    # b leaves, c joins: a keeps its ids, c gets new ones (b's are never reused)
    change = layout.update([a, Node("c", "10.0.0.3", "cpu", (0, 1))], cfg)
    assert [p.node.node_id for p in change.left] == ["b"] and change.left[0].ids == (4, 5)
    assert [(p.node.node_id, p.ids) for p in change.joined] == [("c", (6, 7))]
    assert change.pool.ids == (0, 1, 2, 3, 6, 7)
    assert change.pool.groups == ((0, 1, 2, 3), (6, 7))
    assert layout.locate((6,)).local((6, 7)) == (0, 1)
    assert not layout.update([a, Node("c", "10.0.0.3", "cpu", (0, 1))], cfg).joined


def test_nodes_of_one_machine_are_numbered_in_order_of_their_cores(tmp_path: Path) -> None:
    change = ClusterLayout().update([Node("a", "h", "cpu", (1,)), Node("b", "h", "cpu", (0,))],
                                    ray_cfg(tmp_path))
    assert [(p.node.node_id, p.ids) for p in change.joined] == [("b", (0,)), ("a", (1,))]


def test_gpu_nodes_and_nodes_of_another_kind(tmp_path: Path) -> None:
    cfg = ray_cfg(tmp_path)
    layout = ClusterLayout()
    change = layout.update([Node("g1", "h1", "a100", (0, 1, 2, 3)),
                            Node("g2", "h2", "a100", (0, 1, 2, 3)),
                            Node("c", "h3", "cpu", (0, 1)), Node("head", "h0", "cpu", ())], cfg)
    assert change.pool.kind == "a100" and change.pool.count == 8
    assert change.pool.groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert change.pool.memory_bytes == 80 << 30
    assert [n.node_id for n in change.unused] == ["c"]  # one pool, one device kind
    assert layout.locate((5, 6)).local((5, 6)) == (1, 2)


def test_plan_takes_a_cluster_of_n_nodes(tmp_path: Path) -> None:
    """`samullm plan --devices 4xa100x8`: the pool `serve` would have on such a cluster."""
    pool = planning_pool("4xa100x8", parse_config({}))
    assert pool.kind == "a100" and pool.ids == tuple(range(32))
    assert pool.groups == tuple(tuple(range(i, i + 8)) for i in range(0, 32, 8))
    assert planning_pool("2xcpux4", parse_config({})).groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    with pytest.raises(ConfigError, match="NxKINDxM"):
        planning_pool("4xtpux8", parse_config({}))


def test_ray_nodes_are_read_as_nodes() -> None:
    labelled = {"NodeID": "n1", "Alive": True, "NodeManagerAddress": "10.1.1.1",
                "Resources": {"CPU": 1.0}, "Labels": {"samullm-cores": "1"}}
    assert node_from_ray(labelled) == Node("n1", "10.1.1.1", "cpu", (1,))
    plain = {"NodeID": "n2", "Alive": True, "NodeManagerAddress": "h", "Resources": {"CPU": 4.0}}
    assert node_from_ray(plain).devices == (0, 1, 2, 3)
    gpu = {"NodeID": "n3", "Alive": True, "NodeManagerAddress": "h",
           "Resources": {"CPU": 32.0, "GPU": 8.0, "accelerator_type:A100": 1.0}}
    assert node_from_ray(gpu) == Node("n3", "h", "a100", tuple(range(8)))
    assert node_from_ray({**plain, "Alive": False}) is None
    assert parse_cores("0-2,5") == (0, 1, 2, 5) and parse_cores("") == ()


def test_placement_group_names_are_the_gateways_own(tmp_path: Path) -> None:
    a, b = gateway_prefix(tmp_path / "s1"), gateway_prefix(tmp_path / "s2")
    assert a.startswith("samullm-") and a != b and a == gateway_prefix(tmp_path / "s1")


def test_cluster_config_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cluster\.backend"):
        parse_config({"cluster": {"backend": "k8s"}})
    with pytest.raises(ConfigError, match=r"cluster\.address: local:N"):
        parse_config({"cluster": {"backend": "ray", "address": "local:0"}})
    with pytest.raises(ConfigError, match=r"devices\.ids"):
        parse_config({"cluster": {"backend": "ray"}, "devices": {"ids": [0]}})
    with pytest.raises(ConfigError, match="ray"):
        discover_pool(ray_cfg(tmp_path))  # a ray pool is the launcher's layout


def test_a_guard_under_a_guard_ends_with_its_command() -> None:
    """An engine on a Ray node runs under two guards of one group (`runtime.engines.ray_host`);
    neither waits for the other's grace period."""
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "runtime.engines.guard", sys.executable, "-m",
                    "runtime.engines.guard", "sleep", "0.3"], cwd=REPO, check=True,
                   start_new_session=True, timeout=15)
    assert time.monotonic() - t0 < 5  # the grace period is 20 s


def test_nodes_show_in_metrics() -> None:
    gm = GatewayMetrics()
    gm.bind_nodes(lambda: [{"node": "n1", "address": "10.0.0.1", "device_kind": "cpu",
                            "devices": [0, 1]}])
    text = gm.render().decode()
    assert 'samullm_node_devices{address="10.0.0.1",kind="cpu",node="n1"} 2.0' in text
    assert "samullm_cluster_nodes 2.0" not in text and "samullm_cluster_nodes 1.0" in text


class NodeLauncher(FakeLauncher):
    """Engines on nodes: a launch on devices of a node that is gone raises NodeLost."""

    gone: set[int] = set()

    async def launch(self, spec: EngineSpec):
        if set(spec.devices) & self.gone:
            raise NodeLost(f"devices {list(spec.devices)} are on no node")
        return await super().launch(spec)


async def test_a_lost_node_is_an_engine_death_for_each_engine_on_it(tmp_path: Path) -> None:
    cfg = dataclasses.replace(make_cfg(tmp_path), cluster=ClusterConfig(backend="ray"))
    layout = ClusterLayout()
    n1, n2 = Node("n1", "10.0.0.1", "cpu", (0, 1)), Node("n2", "10.0.0.2", "cpu", (0, 1))
    first = layout.update([n1, n2], cfg)
    launcher = NodeLauncher(delay_s={"a": 0.02, "b": 0.02})
    launcher.gone = set()
    ex = PoolExecutor(cfg, launcher, pool=first.pool, clock=ManualClock(auto=True))
    await ex.start()
    try:
        ex.nodes_changed(first)
        assert [n["node"] for n in ex.health()["nodes"]] == ["n1", "n2"]
        ex.submit("b", items("a", 60) + items("b", 60), sink := Sink())
        while len(sink.outcomes) < 10 or not any(
                set(e.spec.devices) & {2, 3} for e in launcher.alive()):
            await asyncio.sleep(0.01)
        on_n2 = [e for e in launcher.alive() if set(e.spec.devices) & {2, 3}]
        launcher.gone = {2, 3}
        change = layout.update([n1], cfg)
        for e in on_n2:
            e.kill()  # its actor died with the node
        ex.nodes_changed(change)
        await asyncio.wait_for(ex.wait("b"), 30)
        got = sink.by_id()
        assert len(got) == 120 and all(o.ok for o in got.values())
        events = ex.events("b")
        left = [e for e in events if e["event"] == "node_left"]
        assert left and left[0]["devices"] == [2, 3]
        died = [e for e in events if e["event"] == "engine_failed"]
        assert {e["pid"] for e in died} == {e.pid for e in on_n2}
        assert all("left the cluster" in e["message"] for e in died)
        assert not [e for e in events if e["event"] == "engine_start_failed"]
        later = launcher.engines[len(launcher.engines) - 1]
        assert set(later.spec.devices) <= {0, 1}
        assert ex.health()["nodes"] == [p.describe() for p in change.nodes]
        assert ex.pool.ids == (0, 1)
    finally:
        await ex.close()
    assert launcher.overlaps == [] and launcher.alive() == []


async def test_a_start_on_a_node_gone_is_no_start_failure(tmp_path: Path) -> None:
    """The plan still names a node the launcher finds gone: the slot dies (a re-plan moves it),
    and its model's requests are not failed as `engine_start_failed`."""
    cfg = dataclasses.replace(make_cfg(tmp_path), cluster=ClusterConfig(backend="ray"))
    layout = ClusterLayout()
    n1, n2 = Node("n1", "h1", "cpu", (0,)), Node("n2", "h2", "cpu", (0,))
    first = layout.update([n1, n2], cfg)
    launcher = NodeLauncher(delay_s={"a": 0.01, "b": 0.01})
    launcher.gone = {1}  # n2 is gone, and the executor has not heard yet
    ex = PoolExecutor(cfg, launcher, pool=first.pool, clock=ManualClock(auto=True))
    await ex.start()
    try:
        ex.submit("b", items("a", 20) + items("b", 20), sink := Sink())
        for _ in range(300):
            if any(e["event"] == "engine_failed" for e in ex.events("b")):
                break
            await asyncio.sleep(0.01)
        ex.nodes_changed(layout.update([n1], cfg))  # the node watch catches up
        await asyncio.wait_for(ex.wait("b"), 30)
        got = sink.by_id()
        assert len(got) == 40 and all(o.ok for o in got.values())
        kinds = [e["event"] for e in ex.events("b")]
        assert "engine_failed" in kinds and "engine_start_failed" not in kinds
    finally:
        await ex.close()


async def test_a_node_lost_while_a_pass_stops_an_engine_is_planned_again(tmp_path: Path) -> None:
    """A pass stops the engine of a model that finished (slowly) and, meanwhile, the node of the
    other model's engine leaves: when the pass ends nothing runs, but a pass is already asked for
    (the engine death, the node change). That one places the model on the node left; its
    requests are not failed as stranded (`planning_failed`), as they were in the full suite's
    real two-node test on 5 Dec."""
    cfg = dataclasses.replace(make_cfg(tmp_path), cluster=ClusterConfig(backend="ray"))
    layout = ClusterLayout()
    nodes = [Node("n1", "h1", "cpu", (0,)), Node("n2", "h2", "cpu", (0,))]
    first = layout.update(nodes, cfg)
    launcher = NodeLauncher(delay_s={"a": 0.01, "b": 0.2}, stop_delays={"a": 0.5})
    launcher.gone = set()
    ex = PoolExecutor(cfg, launcher, pool=first.pool, clock=ManualClock(auto=True))
    await ex.start()
    try:
        ex.nodes_changed(first)
        ex.submit("b", items("a", 4) + items("b", 40), sink := Sink())
        while not any(e["event"] == "engine_stop" and e["model"] == "a" for e in ex.events("b")):
            await asyncio.sleep(0.01)
        (b,) = launcher.alive("b")
        lost = nodes[b.spec.devices[0]]
        launcher.gone = set(b.spec.devices)
        b.kill()  # its actor died with the node
        ex.nodes_changed(layout.update([n for n in nodes if n is not lost], cfg))
        await asyncio.wait_for(ex.wait("b"), 30)
        got = sink.by_id()
        assert [o.error for o in got.values() if not o.ok] == []
        assert len(got) == 44
    finally:
        await ex.close()


def test_the_actor_body_confines_and_its_death_takes_the_engine_down(monkeypatch, tmp_path) -> None:
    """`EngineHost` (the actor's body) without Ray: a stand-in engine (`sleep`) runs on the
    planned core at the planned niceness under two guards of one group; `stop()` ends the group,
    and a SIGKILL of the outer guard (Ray killing a dead actor's children) ends it too."""
    from runtime.engines import ray_host
    from runtime.engines.procs import group_pids

    def stand_in(spec, port, python, host):
        return [python, "-m", "runtime.engines.guard", "sleep", "60"], dict(os.environ)
    monkeypatch.setattr(ray_host, "build_command", stand_in)
    monkeypatch.setattr(ray_host, "node_address", lambda: "127.0.0.1")
    core = sorted(os.sched_getaffinity(0))[-1]
    mc = parse_config({"models": [{"name": "m", "path": "/x"}]}).models[0]
    spec = EngineSpec(model=mc, model_path=Path("/x"), devices=(core,),
                      log_path=tmp_path / "e.log")
    for kill in (False, True):
        host = ray_host.EngineHost()
        info = host.start(spec, os.getpriority(os.PRIO_PROCESS, 0) + 3)
        assert info["url"].startswith("http://127.0.0.1:")
        pgid = info["pid"]
        deadline = time.monotonic() + 10
        while len(group_pids(pgid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = group_pids(pgid)
        assert len(pids) == 3  # outer guard, inner guard, the engine
        assert all(os.sched_getaffinity(p) == {core} for p in pids)
        assert all(os.getpriority(os.PRIO_PROCESS, p) >= 3 for p in pids)
        if kill:
            os.kill(pgid, signal.SIGKILL)
            host.proc.wait(5)
        else:
            assert host.poll() is None
            host.stop(10)
        deadline = time.monotonic() + 10
        while group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not group_pids(pgid), "the engine outlived its guards"
        assert host.poll() is not None
