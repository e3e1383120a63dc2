"""The Ray cluster engines run on (`[cluster] backend = "ray"`): joining it, reading its nodes as
`runtime.engines.devices.Node`s, and the placement groups this gateway owns (one per engine).

Ray is imported inside functions (the local backend never loads it). One Ray connection per process,
as Ray has it; `local:N` starts an in-process test cluster (`ray.cluster_utils.Cluster`) of N nodes
on this machine's cores, split evenly, each node labelled with its cores, and keeps it for the
process's life.

A node's cores: the label `samullm-cores` ("0-3,6": `ray start --labels='{"samullm-cores":
"0-3"}'`) when it has one (nodes sharing a machine, as `local:N` makes them), else its first `CPU`
cores (0..CPU-1). A node with GPUs offers its GPUs (0..GPU-1), of the kind its
`accelerator_type:*` resource names. A node with neither (a head started with `--num-cpus=0` to
keep its cores for the gateway) offers nothing.

Placement groups are named `<prefix><model>-<n>`, the prefix derived from this machine's name and
the state dir, so a gateway restarted on the same state dir finds (and removes) every group its
killed predecessor left, and never touches another gateway's. Ray removes a dead driver's groups
and actors itself; reaping by name covers what it has not yet.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import socket
from pathlib import Path
from typing import Any

from runtime.config import ClusterConfig, ConfigError
from runtime.engines.devices import Node

log = logging.getLogger(__name__)
CORES_LABEL = "samullm-cores"
NODE_ID_LABEL = "ray.io/node-id"
PG_PREFIX = "samullm-"
LOCAL_OBJECT_STORE = 80 << 20  # bytes per node of a `local:N` cluster (Ray's least is 75 MiB)
_LOCAL: list[Any] = []  # the `local:N` cluster of this process


def gateway_prefix(state_dir: Path) -> str:
    """Name prefix of this gateway's placement groups (same host and state dir, same prefix)."""
    key = f"{socket.gethostname()}:{Path(state_dir).resolve()}"
    return f"{PG_PREFIX}{hashlib.sha1(key.encode()).hexdigest()[:10]}-"


def parse_cores(text: str) -> tuple[int, ...]:
    """"0-2,5" -> (0, 1, 2, 5); "" -> ()."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return tuple(sorted(set(out)))


def connect(cfg: ClusterConfig) -> None:
    """Join the cluster `cfg.address` names (idempotent). Workers import this checkout as the
    gateway does: every node runs the same `make install` (an editable install) at the same path.
    No job-wide runtime_env: a worker of one needs a fresh process of its own (an engine's actor
    took ~1.0 s to answer with one, ~0.5 s without)."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.address
    if address.startswith("local:"):
        address = local_cluster(int(address[6:]))
    try:
        ray.init(address=address, namespace=cfg.namespace, log_to_driver=False,
                 configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cluster.address: cannot join the Ray cluster at {cfg.address!r}: "
                          f"{exc}") from exc


def local_cluster(n: int) -> str:
    """Start (once per process) a test cluster of `n` nodes on this machine's cores."""
    from ray.cluster_utils import Cluster

    if _LOCAL:
        return _LOCAL[0].address
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < n:
        raise ConfigError(f"cluster.address: local:{n} needs {n} cores, this process has "
                          f"{len(cores)}")
    per = len(cores) // n
    parts = [cores[i * per:(i + 1) * per] for i in range(n)]

    def args(part: list[int]) -> dict[str, Any]:
        return {"num_cpus": len(part), "object_store_memory": LOCAL_OBJECT_STORE,
                "labels": {CORES_LABEL: ",".join(map(str, part))}}
    cluster = Cluster(initialize_head=True, head_node_args=args(parts[0]))
    for part in parts[1:]:
        cluster.add_node(**args(part))
    _LOCAL.append(cluster)
    atexit.register(_local_down, cluster)
    return cluster.address


def _local_down(cluster: Any) -> None:
    """At exit: leave the cluster (Ray refuses to remove the node its driver is on), stop it."""
    import ray

    ray.shutdown()
    cluster.shutdown()


def node_from_ray(info: dict[str, Any]) -> Node | None:
    """A `ray.nodes()` entry as a Node, None when it is dead."""
    if not info.get("Alive"):
        return None
    res = info.get("Resources") or {}
    labels = info.get("Labels") or {}
    gpus = int(res.get("GPU", 0))
    if gpus:
        kinds = [k.split(":", 1)[1].lower() for k in res if k.startswith("accelerator_type:")]
        kind = kinds[0] if kinds else "cuda"
        return Node(info["NodeID"], info["NodeManagerAddress"], kind, tuple(range(gpus)))
    cores = parse_cores(labels.get(CORES_LABEL, "")) or tuple(range(int(res.get("CPU", 0))))
    return Node(info["NodeID"], info["NodeManagerAddress"], "cpu", cores)


def read_nodes() -> list[Node]:
    """The cluster's alive nodes (a blocking call to Ray's GCS: run it in a thread)."""
    import ray

    return [n for n in map(node_from_ray, ray.nodes()) if n is not None]


def owned_groups(prefix: str) -> list[str]:
    """Names of the live (not removed) placement groups whose name starts with `prefix`."""
    from ray.util.placement_group import placement_group_table

    return sorted(info["name"] for info in placement_group_table().values()
                  if info.get("name", "").startswith(prefix) and info.get("state") != "REMOVED")


def remove_group(name: str) -> bool:
    """Remove the placement group `name` (its actors die with it); False when there is none."""
    import ray
    from ray.util.placement_group import remove_placement_group

    try:
        pg = ray.util.get_placement_group(name)
    except ValueError:
        return False
    remove_placement_group(pg)
    return True


def reap(prefix: str) -> list[str]:
    """Remove every placement group a gateway of `prefix` left (blocking: run it in a thread)."""
    names = owned_groups(prefix)
    for name in names:
        remove_group(name)
    return names


def placement(name: str, node_id: str, bundle: dict[str, float]) -> Any:
    """A placement group of one bundle on node `node_id` (a label selector: that node or
    nothing; STRICT_PACK keeps the bundle whole)."""
    from ray.util.placement_group import placement_group

    return placement_group([bundle], strategy="STRICT_PACK", name=name,
                           bundle_label_selector=[{NODE_ID_LABEL: node_id}])
