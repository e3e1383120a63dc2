"""Load benchmark: N concurrent clients upload, create, poll and list for D seconds (loopback) while a
batch executes on real tiny vLLM engines.

Starts `samullm serve` as a subprocess with a temp state dir and a config whose model is a tiny
random-weight model (`tools.tinymodel.write_tiny_model`, reused from `.samullm/test-models/` when
present), submits a long batch, waits until the engine produces output, then runs the clients and
prints p50/p99 latency per endpoint and the error count. Stops the server with SIGTERM at the end.

    .venv/bin/python bench/load.py [--clients 50] [--duration 60] [--think-ms 25]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"


def tiny_model(tmp: Path) -> Path:
    cached = REPO / ".samullm" / "test-models" / "tiny-a"
    if (cached / "config.json").exists():
        return cached
    sys.path.insert(0, str(REPO))
    from tools.tinymodel import write_tiny_model

    return write_tiny_model(tmp / "tiny")


def line(cid: str, max_tokens: int) -> bytes:
    return json.dumps({"custom_id": cid, "method": "POST", "url": CHAT, "body": {
        "model": "tiny", "max_tokens": max_tokens, "ignore_eos": True,
        "messages": [{"role": "user", "content": f"request {cid}"}]}}).encode() + b"\n"


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def own_loop_lag(stop: float, out: list[float], interval_s: float = 0.02) -> None:
    """This client process's own event-loop lag (ms): latency it adds to every measured call."""
    loop = asyncio.get_running_loop()
    while time.monotonic() < stop:
        due = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        out.append(max(0.0, loop.time() - due) * 1000)


def lag_histogram(metrics_text: str) -> dict[float, float]:
    """Cumulative bucket counts of the gateway's samullm_event_loop_lag_seconds (le -> count)."""
    out = {}
    for ln in metrics_text.splitlines():
        m = re.match(r'samullm_event_loop_lag_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)', ln)
        if m:
            out[float(m.group(1))] = float(m.group(2))
    return out


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """Upper bound (ms) of the bucket holding quantile q of the observations between two scrapes."""
    delta = {le: after[le] - before.get(le, 0.0) for le in sorted(after)}
    total = delta.get(float("inf"), 0.0)
    for le, n in delta.items():
        if total and n >= q * total:
            return le * 1000
    return float("nan")


def server_times(log_path: Path) -> dict[str, list[float]]:
    """Handler time (ms) per endpoint from the gateway's access log (what the server itself spent,
    from the middleware's start to the answer; the loop lag before it is not in it)."""
    pat = re.compile(r"samullm\.access .*?: (GET|POST) (\S+) \d+ ([0-9.]+)ms")
    out: dict[str, list[float]] = defaultdict(list)
    for ln in log_path.read_text(errors="replace").splitlines():
        m = pat.search(ln)
        if m:
            path = re.sub(r"(batch_|file-)[0-9a-f]+", "{id}", m.group(2).split("?")[0])
            out[f"{m.group(1)} {path}"].append(float(m.group(3)))
    return out


async def client(http: aiohttp.ClientSession, main_batch: str, stop: float, rng: random.Random,
                 lat: dict[str, list[float]], errors: dict[str, int], think_s: float) -> None:
    own_files: list[str] = []
    while time.monotonic() < stop:
        op = rng.choices(["upload", "create", "get_batch", "list_batches", "list_files",
                          "get_file"], weights=[1, 1, 6, 2, 2, 1])[0]
        t0 = time.perf_counter()
        try:
            if op == "upload":
                form = aiohttp.FormData()
                form.add_field("purpose", "batch")
                form.add_field("file", line(f"u{rng.random()}", 2), filename="x.jsonl")
                async with http.post("/v1/files", data=form) as r:
                    ok = r.status == 200
                    if ok:
                        own_files.append((await r.json())["id"])
            elif op == "create" and own_files:
                async with http.post("/v1/batches", json={
                        "input_file_id": own_files[-1], "endpoint": CHAT,
                        "completion_window": "24h"}) as r:
                    ok = r.status == 200
                    await r.read()
            elif op == "get_file" and own_files:
                async with http.get(f"/v1/files/{rng.choice(own_files)}") as r:
                    ok = r.status == 200
                    await r.read()
            elif op in ("create", "get_file"):
                continue
            else:
                path = {"get_batch": f"/v1/batches/{main_batch}", "list_batches": "/v1/batches",
                        "list_files": "/v1/files?limit=100"}[op]
                async with http.get(path) as r:
                    ok = r.status == 200
                    await r.read()
        except aiohttp.ClientError:
            ok = False
        lat[op].append((time.perf_counter() - t0) * 1000)
        if not ok:
            errors[op] += 1
        await asyncio.sleep(rng.uniform(0, 2 * think_s))


async def run(n_clients: int, duration: float, think_s: float) -> None:
    served = float("nan")
    client_lag: list[float] = []
    lag_before: dict[float, float] = {}
    lag_after: dict[float, float] = {}
    tmp = Path(tempfile.mkdtemp(prefix="samullm-load-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp / "load.toml"
    cfg.write_text(
        f'[server]\nport = {port}\nstate_dir = "{tmp / "state"}"\n'
        '[devices]\nkind = "cpu"\nids = [1]\ncpu_kvcache_gib = 0.25\n'
        '[scheduler]\nstrategy = "sequential"\n'
        f'[[models]]\nname = "tiny"\npath = "{tiny_model(tmp)}"\nmax_model_len = 1024\n'
        'max_num_seqs = 16\nmax_num_batched_tokens = 1024\nengine_args = {enforce_eager = true}\n')
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = open(tmp / "serve.log", "wb")
    proc = subprocess.Popen([str(REPO / ".venv/bin/samullm"), "serve", "--config", str(cfg)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(url) as http:
            for _ in range(600):
                try:
                    async with http.get("/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", b"".join(line(f"m{i}", 200) for i in range(3000)),
                           filename="main.jsonl")
            async with http.post("/v1/files", data=form) as r:
                fid = (await r.json())["id"]
            async with http.post("/v1/batches", json={"input_file_id": fid, "endpoint": CHAT,
                                                      "completion_window": "24h"}) as r:
                main_batch = (await r.json())["id"]
            t0 = time.monotonic()
            while True:  # the engine has started once requests complete
                async with http.get(f"/v1/batches/{main_batch}") as r:
                    b = await r.json()
                if b["request_counts"]["completed"] > 0 or b["status"] not in (
                        "validating", "in_progress"):
                    break
                await asyncio.sleep(0.5)
            print(f"engine up after {time.monotonic() - t0:.0f} s; load for {duration:.0f} s "
                  f"with {n_clients} clients, mean think time {think_s * 1000:.0f} ms", flush=True)
            lat: dict[str, list[float]] = defaultdict(list)
            errors: dict[str, int] = defaultdict(int)
            stop = time.monotonic() + duration
            conn = aiohttp.TCPConnector(limit=n_clients)
            async with http.get("/metrics") as r:
                lag_before = lag_histogram(await r.text())
            async with aiohttp.ClientSession(url, connector=conn) as load:
                t_load = time.monotonic()
                await asyncio.gather(own_loop_lag(stop, client_lag),
                                     *(client(load, main_batch, stop, random.Random(i), lat,
                                              errors, think_s) for i in range(n_clients)))
                served = sum(len(x) for x in lat.values()) / (time.monotonic() - t_load)
            async with http.get("/metrics") as r:
                lag_after = lag_histogram(await r.text())
            async with http.get(f"/v1/batches/{main_batch}") as r:
                b = await r.json()
            print(f"main batch while loaded: {b['status']} {b['request_counts']}")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)  # SIGTERM stops the engines too (no orphans)
    print(f"{'endpoint':<14}{'n':>7}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for op in sorted(lat):
        xs = lat[op]
        print(f"{op:<14}{len(xs):>7}{percentile(xs, .5):>9.1f}{percentile(xs, .99):>9.1f}"
              f"{errors[op]:>8}")
    print("gateway handler time (access log, ms):")
    for ep, xs in sorted(server_times(tmp / "serve.log").items()):
        if len(xs) >= 20:
            print(f"  {ep:<24}{len(xs):>7}  p50 {percentile(xs, .5):7.1f}  p99 "
                  f"{percentile(xs, .99):7.1f}")
    if lag_after:
        print(f"gateway event-loop lag (20 ms timer, bucket upper bounds): p50 <= "
              f"{bucket_quantile(lag_before, lag_after, .5):.1f} ms, p99 <= "
              f"{bucket_quantile(lag_before, lag_after, .99):.1f} ms")
    print(f"load client's own event-loop lag: p50 {percentile(client_lag, .5):.1f} ms, p99 "
          f"{percentile(client_lag, .99):.1f} ms, max {max(client_lag, default=float('nan')):.0f} ms")
    print(f"total errors: {sum(errors.values())}; {served:.0f} requests/s served; "
          f"server exit code after SIGTERM: {code}; load average {os.getloadavg()[0]:.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--duration", type=float, default=60)
    p.add_argument("--think-ms", type=float, default=25,
                   help="mean pause between one client's calls (uniform 0..2x); 25 ms saturates "
                        "the gateway (closed loop), ~500 ms is a team of pollers")
    args = p.parse_args()
    asyncio.run(run(args.clients, args.duration, args.think_ms / 1000))


if __name__ == "__main__":
    main()
