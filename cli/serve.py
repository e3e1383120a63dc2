"""`samullm serve`: load the config, take the state dir's lock, bind the port, optionally write missing
demo models, print where things are, and run the gateway with the real executor until SIGINT/SIGTERM.

The lock and the port come first: a gateway that cannot own its state dir or cannot listen exits
before it resumes a batch or starts a spare engine process (it would run work nobody can reach)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import socket
import sys
from pathlib import Path

from aiohttp import web

from gateway.app import create_app
from gateway.auth import check_bind
from gateway.logs import setup_logging
from gateway.state_dir import StateDirError, StateDirLock
from runtime.config import Config, ConfigError, load_config
from runtime.engines.devices import discover_pool
from runtime.engines.engine import VllmLauncher, base_env
from runtime.engines.ray_launcher import RayLauncher
from runtime.engines.spares import SparePool, spare_count
from runtime.executor.autoprofile import ProfileLaunch, ProfileProcess
from runtime.executor.executor import PoolExecutor
from runtime.executor.planner_process import ProcessPlanner
from tools.tinymodel import write_tiny_model

log = logging.getLogger("samullm.serve")


def apply_overrides(cfg: Config, args: argparse.Namespace) -> Config:
    """`--host/--port/--state-dir` win over `[server]` (then re-validated)."""
    server = cfg.server
    for flag, key in (("host", "host"), ("port", "port"), ("state_dir", "state_dir")):
        value = getattr(args, flag, None)
        if value is not None:
            server = dataclasses.replace(server, **{key: value})
    cfg = dataclasses.replace(cfg, server=server)
    cfg.validate()
    return cfg


def make_demo_models(cfg: Config) -> list[Path]:
    """Write each configured model that has a `demo` table and no weights on disk yet."""
    written = []
    for m in cfg.models:
        path = m.resolved_path(cfg.base_dir)
        if m.demo is None or path is None or (path / "config.json").exists():
            continue
        d = m.demo
        print(f"writing demo model {m.name!r} to {path} ...", flush=True)
        write_tiny_model(path, layers=d.layers, hidden=d.hidden, heads=d.heads,
                         kv_heads=d.kv_heads, seed=d.seed,
                         max_position=max(4096, m.max_model_len))
        written.append(path)
    return written

# a background profile (`[scheduler] auto_profile`) is a quick one: its cost is in that key's help
AUTO_PROFILE_ARGS = ("--quick",)


def auto_profile_launch(config_path: str | Path, cfg: Config,
                        extra: tuple[str, ...] = AUTO_PROFILE_ARGS) -> ProfileLaunch:
    """How the executor's background profiling runs one shape: `samullm profile` of this config
    file into this gateway's state dir (a subprocess: the runtime does not import the tools)."""
    argv = [sys.executable, "-m", "cli.main", "profile", "--config",
            str(Path(config_path).resolve()), "--state-dir", str(cfg.state_dir.resolve()), *extra]
    return ProfileProcess.launcher(lambda shape: [*argv, *shape.cli_args()],
                                   cfg.state_dir / "logs", cfg.devices.confine_cpu_engines)


def default_executor(cfg: Config, config_path: str | Path | None = None) -> PoolExecutor:
    """The real executor on vLLM engines (the composition root: the gateway never imports the
    engine stack; tests hand `create_app` a double). With `config_path` (the file `cfg` was
    loaded from), `[scheduler] auto_profile = "idle"` can run the profiler on it."""
    # the planner in its own process: in a thread it would hold the GIL the event loop needs
    planner = ProcessPlanner()
    planner.warm_up()  # from this (the main) thread: the worker's parent-death signal is tied to it
    if cfg.cluster.backend == "ray":  # engines on the cluster's nodes: no spares, no auto profile
        cluster = RayLauncher(cfg)
        executor = PoolExecutor(cfg, cluster, planner=planner, pool=cluster.connect())
        cluster.on_nodes = executor.nodes_changed
        return executor
    pool = discover_pool(cfg)
    n_spares = spare_count(cfg, pool)
    spares = SparePool(n_spares, cfg.state_dir / "logs", base_env) if n_spares else None
    launcher = VllmLauncher(spares=spares, state_dir=cfg.state_dir)  # state_dir: /dev/shm records
    launch = auto_profile_launch(config_path, cfg) if config_path is not None else None
    return PoolExecutor(cfg, launcher, planner=planner, pool=pool, profile_launch=launch)


def serve_main(args: argparse.Namespace) -> int:
    cfg = apply_overrides(load_config(args.config), args)
    check_bind(cfg.server.host, cfg.auth.api_keys)  # ConfigError -> exit code 2 in the CLI
    setup_logging(cfg.server.log_json)
    try:
        lock = StateDirLock(cfg.state_dir).acquire()
    except StateDirError as exc:
        print(f"samullm: {exc}", file=sys.stderr)
        return 2
    try:
        sock = socket.create_server((cfg.server.host, cfg.server.port))
    except OSError as exc:
        print(f"samullm: cannot listen on {cfg.server.host}:{cfg.server.port}: {exc}",
              file=sys.stderr)
        return 2
    if getattr(args, "make_demo_models", False):
        make_demo_models(cfg)
    try:
        executor = default_executor(cfg, args.config)
    except ConfigError as exc:  # a Ray cluster it cannot join
        lock.release()
        print(f"samullm: {exc}", file=sys.stderr)
        return 2
    pool = executor.pool
    assert pool is not None
    print(f"state dir: {cfg.state_dir.resolve()}")
    for m in cfg.models:
        path = m.resolved_path(cfg.base_dir)
        print(f"model {m.name}: {path if path is not None else 'plan only'} "
              f"({', '.join(m.served_endpoints)})")
    print(f"devices: {pool.kind} {list(pool.ids)}")
    if isinstance(executor.launcher, RayLauncher):
        for node in executor.launcher.nodes():
            print(f"node {node['node'][:12]} {node['address']}: {node['device_kind']} devices "
                  f"{node['devices']} (its own {node['local_devices']})")
    if pool.kind == "cpu":
        print(f"cpu engines: confined to their cores: {cfg.devices.confine_cpu_engines}; "
              f"spare engine processes: {getattr(executor.launcher.spares, 'size', 0)}")
    if cfg.scheduler.auto_profile != "off":
        print(f"background profiling: {cfg.scheduler.auto_profile} (shapes without a profile, "
              f"while no batch runs; logs under {cfg.state_dir / 'logs'})")
    print(f"serving on http://{cfg.server.host}:{cfg.server.port}/v1", flush=True)
    try:
        web.run_app(create_app(cfg, executor, lock=lock, on_live_batches=executor.gateway_batches),
                    sock=sock, print=None, handle_signals=True,
                    access_log=None)  # gateway.logs writes access lines
    except StateDirError as exc:
        print(f"samullm: {exc}", file=sys.stderr)
        return 2
    finally:
        lock.release()
    return 0

