"""Beyond one node: planning a cluster, and the Ray path's overhead (issue 14's measurements).

1. `--plan`: the 9 LLM-Blender models x 10,000 requests each (the paper's ensembling workload,
   `paper_workloads`) planned on 1 node of 8 A100s against 4 nodes of 8 (each node one topology
   group, as `serve` lays out a Ray cluster: `samullm plan --devices 4xa100x8`): planning wall time
   on this machine (target <= 2 s) and the predicted makespan.
2. `--run`: `bench.makespan`'s mixed workload (tiny-a 64, small 64, medium 32) through a real
   `samullm serve` on this machine's two cores, once with the local backend and once on a 2-node
   local Ray cluster (`[cluster] address = "local:2"`: one core per node, engines in placement
   groups through actors); the local backend with and without spare engine processes (an engine on
   the cluster never starts in one). Before each measured batch a smoke batch on the same state dir
   lets the gateway measure its engine starts (start times are kept per backend), so each
   prediction is made with that backend's own starts. Makespan from `batches.create` to the poll
   that sees `completed`; predicted = the first plan event. Profiles: `bench.makespan`'s, TP 1 on
   one core only (`--quick-profile` measures them when missing).

    .venv/bin/python -m bench.cluster --plan --data ../shared/data
    .venv/bin/python -m bench.cluster --run --data ../shared/data --quick-profile [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import demo_setup as setup  # noqa: E402
from bench import gateway_run as gw  # noqa: E402
from bench import makespan as mk  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MIXED = {"tiny-a": 64, "small": 64, "medium": 32}
SMOKE = {"tiny-a": 4, "small": 4, "medium": 4}
BACKENDS = {  # name -> lines added to [devices], the [cluster] table
    "local": ("", ""),
    "local-no-spares": ("spare_engines = 0\n", ""),
    "ray-local:2": ("", '\n[cluster]\nbackend = "ray"\naddress = "local:2"\nnode_poll_s = 1.0\n'),
}


def plan_table(data: Path | None, requests: int, nodes: list[int], gpus: int) -> None:
    from paper_workloads import LengthSource, ensembling, problem

    from runtime.config import parse_config
    from runtime.engines.devices import planning_pool
    from scheduler.planner import Planner

    specs, work = ensembling(requests, LengthSource(data))
    print(f"{len(specs)} models x {requests:,} requests, A100-80GB nodes of {gpus} (one group each)")
    print(f"{'nodes':>6}{'GPUs':>6}{'planning s':>12}{'makespan s':>12}  origin / first stage")
    for n in nodes:
        pool = planning_pool(f"{n}xa100x{gpus}", parse_config({}))
        planner = Planner(problem(specs, work, pool, compare_baselines=True))
        t0 = time.perf_counter()
        s = planner.plan("samullm")
        dt = time.perf_counter() - t0
        first = ", ".join(f"{p.model.split('/')[-1]} tp{p.tp}xdp{p.dp}" for p in s.stages[0].plans)
        print(f"{n:>6}{pool.count:>6}{dt:>12.2f}{s.makespan_s:>12.1f}  {s.origin}: {first}",
              flush=True)


def backend_config(root: Path, paths: dict[str, Path], name: str) -> Path:
    devices, cluster = BACKENDS[name]
    cfg = setup.write_config(root, paths, gw.free_port(), (), f"{name}.toml")
    text = cfg.read_text().replace("[devices]\n", "[devices]\nengine_linger_s = 0\n"
                                   "max_threads_per_rank = 1\n" + devices, 1)
    cfg.write_text(text.replace("ids = []\n", "") + cluster)
    return cfg


def run_gateway(cfg: Path, root: Path, inp: Path, expected: list[dict], timeout_s: float,
                tag: str, state: Path) -> gw.GatewayRun:
    """One pooled batch through a fresh `samullm serve` on `state` (samullm strategy)."""
    with gw.serving(cfg, root, tag, "samullm", state=state) as (client, log_path):
        with open(inp, "rb") as f:
            fobj = client.files.create(file=f, purpose="batch")
        t0 = time.monotonic()
        batch = gw.run_to_end(client, fobj.id, {"strategy": "samullm"}, timeout_s, tag)
        makespan = time.monotonic() - t0
        gw.check_output(client.files.content(batch.output_file_id).text, expected, tag)
    return gw.GatewayRun("samullm", makespan, len(expected), gw.executor_events(log_path))


def run(root: Path, paths: dict[str, Path], data: Path | None, quick: bool, repeats: int,
        timeout_s: float, backends: list[str]) -> list[dict]:
    base = backend_config(root, paths, "local")
    setup.SHAPES = ((1, 1),)  # the shape both backends run: TP 1 on one core (one core per node)
    setup.ensure_profiles(base, root, sorted(MIXED), quick)
    words = setup.word_tokens(paths["tiny-a"])
    reqs = setup.make_requests(MIXED, data, 0.25, 0, words)
    smoke = setup.make_requests(SMOKE, data, 0.25, 7, words)
    inp = setup.write_jsonl(root / "cluster-mixed.jsonl", reqs)
    smoke_inp = setup.write_jsonl(root / "cluster-smoke.jsonl", smoke)
    rows = []
    for rep in range(repeats):
        for name in backends:
            cfg = backend_config(root, paths, name)
            state = Path(tempfile.mkdtemp(prefix=f"state-{name}-", dir=root / "runs"))
            (state / "profiles").symlink_to(root / "state" / "profiles")
            run_gateway(cfg, root, smoke_inp, smoke, timeout_s, f"smoke-{name}", state)
            load = gw.wait_quiet(99, 0)
            got = run_gateway(cfg, root, inp, reqs, timeout_s, f"{name}-r{rep}", state)
            starts = [e.get("start_s") for e in got.events if e["event"] == "engine_started"]
            rows.append({"backend": name, "measured_s": got.makespan_s,
                         "predicted_s": got.predicted_s, "load": load, "starts_s": starts})
            print(f"{name:<16} measured {got.makespan_s:6.1f} s  predicted "
                  f"{got.predicted_s or float('nan'):6.1f} s  engine starts "
                  f"{', '.join(f'{s:.1f}' for s in starts if s)} s  (load {load:.2f})", flush=True)
            for line in mk.describe_events(got):
                print(line)
            shutil.rmtree(state, ignore_errors=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", action="store_true")
    ap.add_argument("--run", action="store_true")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--root", type=Path, default=REPO / ".samullm" / "bench-makespan")
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--quick-profile", action="store_true")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    data = args.data if args.data and (args.data / "traces").is_dir() else None
    if args.plan:
        plan_table(data, args.requests, args.nodes, args.gpus)
    if args.run:
        root, paths = setup.prepare(args.root)
        rows = run(root, paths, data, args.quick_profile, args.repeats, args.timeout,
                   args.backends.split(","))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
