"""Measured makespans per strategy through the real gateway, against `vllm run_batch` per model.

For each workload (requests for 3-4 random-weight models of different sizes, prompt and output lengths
drawn from the real conversation trace and scaled to the models' 1k context): start `samullm serve`
(subprocess, generated config, state dir under `--root`), upload the input with the official `openai`
SDK and create ONE pooled batch per strategy (`metadata={"strategy": ...}`); the makespan is the wall
time from `batches.create` to the poll that sees `completed`. Output lengths are forced
(`ignore_eos: true`, `max_tokens` = the drawn length), so every run does the same work. The anchor
runs `python -m vllm.entrypoints.openai.run_batch` once per model, one after another, on the same
requests split per model (same engine args, both cores: `VLLM_CPU_OMP_THREADS_BIND=0-1`).

Predicted makespan: the executor's first `plan` event (read from the gateway's JSON log), which the
planner made with the profiles stored under `<root>/state/profiles/` (`samullm profile` is run for each
(model, TP) missing there). `samullm plan --json` on the same input shows every strategy's stages and
predictions, to explain what the planner chose. The same plan event's `lower_bound_s` (no schedule
can be predicted shorter, `scheduler.bounds`) gives each row's bound and measured / bound.

    .venv/bin/python -m bench.makespan [--data ../shared/data] [--workloads single,mixed,big-vs-tiny,overhead]
        [--strategies samullm,sequential,even-split] [--no-anchor] [--scale-requests 1.0]
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"
MODELS = {  # name -> samullm tiny-model arguments
    "tiny-a": dict(layers=2, hidden=128, heads=2, kv_heads=1, seed=0),
    "tiny-b": dict(layers=2, hidden=128, heads=2, kv_heads=1, seed=3),
    "small": dict(layers=4, hidden=256, heads=4, kv_heads=2, seed=1),
    "medium": dict(layers=8, hidden=512, heads=8, kv_heads=2, seed=2),
}
MAX_MODEL_LEN, MAX_SEQS, MAX_BATCHED, KV_GIB = 1024, 32, 1024, 0.25
ENGINE_ARGS = {"enforce_eager": True}  # no graph compile: starts in ~20 s instead of minutes
# workload -> {model: requests}; "big-vs-tiny" is the non-obvious one (TP=2 helps medium, hurts tiny)
WORKLOADS = {
    "mixed": {"tiny-a": 64, "small": 64, "medium": 32},
    "big-vs-tiny": {"medium": 96, "tiny-a": 48, "tiny-b": 48},
    "single": {"small": 96},
    "smoke": {"tiny-a": 8, "tiny-b": 8},
    # the gateway's own overhead: one model, the same single engine on core 0 on both sides
    "overhead": {"small": 96},
}
ONE_CORE = ("overhead",)
STRATEGIES = ("samullm", "sequential", "even-split")


# ---------------------------------------------------------------------------------------------
# setup: models, config, profiles

def write_models(root: Path) -> dict[str, Path]:
    from tools.tinymodel import write_tiny_model

    out = {}
    for name, args in MODELS.items():
        path = root / "models" / name
        if not (path / "config.json").exists():
            print(f"writing model {name} ({args}) ...", flush=True)
            write_tiny_model(path, **args)
        out[name] = path
    return out


def write_config(root: Path, paths: dict[str, Path], port: int, cores: tuple[int, ...] = (),
                 name: str = "samullm.toml") -> Path:
    lines = ["[server]", 'host = "127.0.0.1"', f"port = {port}",
             f'state_dir = "{(root / "state").resolve()}"', "log_json = true", "",
             "[devices]", 'kind = "cpu"', f"ids = {list(cores)}", f"cpu_kvcache_gib = {KV_GIB}", ""]
    for model, path in paths.items():
        lines += ["[[models]]", f'name = "{model}"', f'path = "{path.resolve()}"', 'dtype = "float32"',
                  f"max_model_len = {MAX_MODEL_LEN}", f"max_num_seqs = {MAX_SEQS}",
                  f"max_num_batched_tokens = {MAX_BATCHED}",
                  "engine_args = { " + ", ".join(f"{k} = {json.dumps(v)}"
                                                 for k, v in ENGINE_ARGS.items()) + " }", ""]
    cfg = root / name
    cfg.write_text("\n".join(lines))
    return cfg


# (tp, cores per rank) shapes the planner can choose on 2 cores: each gets a measured profile
SHAPES = ((1, 1), (2, 1), (1, 2))


def ensure_profiles(cfg_path: Path, root: Path, models: list[str], quick: bool) -> None:
    """`samullm profile` for every (model, tp, threads) shape without a stored profile."""
    from runtime.persist import load_profile, save_profile

    for m in models:
        for tp, th in SHAPES:
            if load_profile(root / "state", m, tp, "cpu", th) is not None:
                continue
            twin = same_architecture(m, lambda o: load_profile(root / "state", o, tp, "cpu", th))
            if twin is not None:  # same shapes, other random weights: the same latency
                save_profile(root / "state", dataclasses.replace(
                    twin, model=m, meta={**twin.meta, "copied_from": twin.model}))
                continue
            # every shape is measured in full: the profiler's served calibration (scales, cold
            # costs) needs the engine it starts to time the start-up (`--no-start-time` skips both)
            cmd = [sys.executable, "-m", "cli.main", "profile", "--config", str(cfg_path),
                   "--model", m, "--tp", str(tp), "--threads", str(th)] + (
                       ["--quick", "--repeats", "1"] if quick else [])
            print("$", " ".join(cmd[2:]), flush=True)
            t0 = time.monotonic()
            subprocess.run(cmd, check=True, cwd=REPO)
            print(f"  profiled in {time.monotonic() - t0:.0f} s", flush=True)


def same_architecture(model: str, find):
    """A profile (via `find(name)`) of another model with the same architecture, or None."""
    shape = {k: v for k, v in MODELS[model].items() if k != "seed"}
    for other, args in MODELS.items():
        if other != model and {k: v for k, v in args.items() if k != "seed"} == shape:
            prof = find(other)
            if prof is not None:
                return prof
    return None


def refresh_start_times(cfg_path: Path, root: Path, models: list[str]) -> None:
    """Re-measure each profile's engine start time now (a profile measured while the machine was
    busy carries a start time several times the quiet one) and store it in the profile."""
    import asyncio

    from runtime.config import load_config
    from runtime.engines.engine import EngineSpec
    from tools.profiler import measure_start_time
    from runtime.persist import load_profile, save_profile

    cfg = load_config(cfg_path)
    for m in models:
        for tp, th in SHAPES:
            prof = load_profile(root / "state", m, tp, "cpu", th)
            mc = cfg.model(m)
            if prof is None or mc is None:
                continue
            spec = EngineSpec(model=mc, model_path=mc.resolved_path(cfg.base_dir),
                              devices=tuple(range(tp * th)), tp=tp, kv_cache_gib=KV_GIB,
                              log_path=root / "logs" / f"start-{m}-tp{tp}-t{th}.log")
            t = asyncio.run(measure_start_time(spec, spare=True))  # as the gateway starts them
            print(f"  start time {m} tp{tp} threads{th}: {t:.1f} s (profile had "
                  f"{prof.latency.load_time_s:.1f} s)", flush=True)
            save_profile(root / "state", dataclasses.replace(
                prof, latency=prof.latency.with_load_time(t),
                meta={**prof.meta, "load_time_refreshed": time.strftime("%Y-%m-%dT%H:%M:%S"),
                      "load_avg_at_refresh": round(os.getloadavg()[0], 2)}))


# ---------------------------------------------------------------------------------------------
# requests

def trace_pairs(data: Path | None, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """n (prompt, output) token pairs: joint rows of the conversation trace when `data` has it, else
    independent draws from the shipped prior quantile tables."""
    csv_path = data / "traces" / "splitwise_conv.csv" if data is not None else None
    if csv_path is not None and csv_path.exists():
        with open(csv_path) as f:
            rows = [(int(r["num_prefill_tokens"]), int(r["num_decode_tokens"]))
                    for r in csv.DictReader(f)]
        return [rows[i] for i in rng.choice(len(rows), size=n, replace=False)]
    from scheduler.lengths import prior_quantiles

    pre, dec = prior_quantiles("conversation", "prefill"), prior_quantiles("conversation", "decode")
    return list(zip(rng.choice(pre, n).tolist(), rng.choice(dec, n).tolist()))


def word_tokens(model_dir: Path) -> list[str]:
    """Words that are one token each with a leading space (so a prompt of k words is k tokens)."""
    from tokenizers import Tokenizer

    from tools.tinymodel import _WORDS

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return [w for w in _WORDS if len(tok.encode(" " + w, add_special_tokens=False).ids) == 1]


def make_requests(workload: dict[str, int], data: Path | None, scale: float, seed: int,
                  words: list[str]) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for model, n in workload.items():
        for i, (p, o) in enumerate(trace_pairs(data, n, rng)):
            p = max(4, min(int(p * scale), MAX_MODEL_LEN // 2))
            o = max(2, min(int(o * scale), MAX_MODEL_LEN - p - 16))
            text = " ".join(words[j] for j in rng.integers(0, len(words), p))
            out.append({"custom_id": f"{model}-{i}", "method": "POST", "url": CHAT,
                        "body": {"model": model, "messages": [{"role": "user", "content": text}],
                                 "max_tokens": o, "ignore_eos": True, "temperature": 1.0}})
    order = rng.permutation(len(out))  # interleave the models, like a real pooled file
    return [out[i] for i in order]


def write_jsonl(path: Path, reqs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    return path


# ---------------------------------------------------------------------------------------------
# the gateway

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


# ---------------------------------------------------------------------------------------------
# the anchor: vllm run_batch per model, one after another

def run_batch_cmd(model: str, path: Path, inp: Path, out: Path, bind: str = "0-1"
                  ) -> tuple[list[str], dict]:
    """Same engine args as the gateway's engines (runtime.engines.engine.build_command), both cores."""
    from runtime.config import ModelConfig
    from runtime.engines.api_server import ENGINE_MAIN
    from runtime.engines.engine import EngineSpec, build_command

    spec = EngineSpec(model=ModelConfig(name=model, path=str(path), max_model_len=MAX_MODEL_LEN,
                                        max_num_seqs=MAX_SEQS, max_num_batched_tokens=MAX_BATCHED,
                                        engine_args=dict(ENGINE_ARGS)),
                      model_path=path, devices=(0, 1), tp=1, kv_cache_gib=KV_GIB)
    cmd, env = build_command(spec, port=0)
    args = cmd[cmd.index(ENGINE_MAIN) + 1:]  # after the wrappers
    drop = {"--host": 2, "--port": 2, "--disable-uvicorn-access-log": 1}
    kept, i = [], 0
    while i < len(args):
        n = drop.get(args[i])
        if n:
            i += n
            continue
        kept.append(args[i])
        i += 1
    env["VLLM_CPU_OMP_THREADS_BIND"] = bind
    return ([sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(inp), "-o", str(out),
             *kept], env)


def bind_cores(bind: str) -> set[int]:
    """"0-1" / "0" / "0,2-3" -> the set of cores."""
    out: set[int] = set()
    for part in bind.replace("|", ",").split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def run_anchor(root: Path, paths: dict[str, Path], reqs: list[dict], tag: str, bind: str = "0-1"
               ) -> tuple[float, dict[str, float]]:
    """Total and per-model wall time of run_batch, one model after another."""
    per = {}
    work = root / "anchor"
    work.mkdir(parents=True, exist_ok=True)
    for model in sorted({r["body"]["model"] for r in reqs}, key=lambda m: -MODELS[m]["hidden"]):
        mine = [r for r in reqs if r["body"]["model"] == model]
        inp = write_jsonl(work / f"{tag}-{model}.jsonl", mine)
        out = work / f"{tag}-{model}.out.jsonl"
        out.unlink(missing_ok=True)
        cmd, env = run_batch_cmd(model, paths[model], inp, out, bind)
        t0 = time.monotonic()
        with open(root / "logs" / f"run_batch-{tag}-{model}.log", "w") as log:
            # confined to its cores like the gateway's engines (EngineSpec.confined_cores)
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                preexec_fn=lambda: os.sched_setaffinity(0, bind_cores(bind))
                                ).returncode
        per[model] = time.monotonic() - t0
        if rc != 0:
            raise RuntimeError(f"run_batch {model} exited {rc}; see logs/run_batch-{tag}-{model}.log")
        check_output(out.read_text(), mine, f"run_batch {model}")
    return sum(per.values()), per


# ---------------------------------------------------------------------------------------------
# offline plan (why the planner chose what it chose)

def offline_plan(cfg_path: Path, inp: Path) -> dict:
    cmd = [sys.executable, "-m", "cli.main", "plan", str(inp), "--config", str(cfg_path), "--json"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": res.stderr[-500:]}
    return json.loads(res.stdout)


def _threads(p: dict) -> str:
    return f"x{p['threads']}threads" if p.get("threads", 1) > 1 else ""


def describe_plan(result: dict) -> list[str]:
    if "error" in result:
        return [f"  samullm plan failed: {result['error']}"]
    out = []
    for s, r in (result.get("strategies") or {}).items():
        stages = " | ".join(
            ", ".join(f"{p['model']} tp{p['tp']}xdp{p['dp']}{_threads(p)}@{p['devices']}"
                      for p in st["plans"])
            + f" ({st['start_s']:.0f}-{st['end_s']:.0f}s)" for st in r.get("stages", []))
        origin = f" [{r['origin']}]" if r.get("origin") else ""
        out.append(f"  plan {s:<16} {r['makespan_s']:7.1f} s{origin}: {stages}")
    return out


def describe_events(run: GatewayRun) -> list[str]:
    out = []
    t0 = run.events[0]["t"] if run.events else 0.0
    for e in run.events:
        if e["event"] in ("plan", "replan"):
            st = ", ".join(f"{p['model']} tp{p['tp']}xdp{p['dp']}{_threads(p)}@{p['devices']}"
                           for p in e["stage"])
            out.append(f"    +{e['t'] - t0:6.1f}s {e['event']:<7} predicted "
                       f"{e['predicted_makespan_s']:.1f}s, {e['stages']} stages; now: {st}")
        elif e["event"] == "engine_started":
            out.append(f"    +{e['t'] - t0:6.1f}s started {e.get('model')} tp{e.get('tp')} on "
                       f"{e.get('devices')} (start {e.get('start_s') or 0:.1f}s"
                       f"{', in a spare' if e.get('spare') else ''})")
        elif e["event"] == "model_finished":
            out.append(f"    +{e['t'] - t0:6.1f}s finished {e.get('model')}")
    return out


# ---------------------------------------------------------------------------------------------

def wait_quiet(max_load: float, max_wait_s: float) -> float:
    t0 = time.monotonic()
    while True:
        load = os.getloadavg()[0]
        if load < max_load or time.monotonic() - t0 > max_wait_s:
            return load
        print(f"load average {load:.2f} >= {max_load}: waiting", flush=True)
        time.sleep(20)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None,
                    help="shared data dir (traces/splitwise_conv.csv); default: shipped prior tables")
    ap.add_argument("--root", type=Path, default=REPO / ".samullm" / "bench-makespan")
    ap.add_argument("--workloads", default="single,mixed,big-vs-tiny,overhead")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--scale", type=float, default=0.25, help="trace lengths x this (4k -> 1k ctx)")
    ap.add_argument("--scale-requests", type=float, default=1.0, help="requests per model x this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-anchor", action="store_true")
    ap.add_argument("--quick-profile", action="store_true")
    ap.add_argument("--refresh-start-times", action="store_true",
                    help="re-measure every stored profile's engine start time before the runs")
    add_wait_args(ap)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per strategy and of the anchor (alternating); the table shows medians")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    (root / "logs").mkdir(parents=True, exist_ok=True)
    (root / "runs").mkdir(parents=True, exist_ok=True)
    paths = write_models(root)
    cfg_path = write_config(root, paths, free_port())
    workloads = {w: {m: max(1, round(n * args.scale_requests)) for m, n in WORKLOADS[w].items()}
                 for w in args.workloads.split(",")}
    ensure_profiles(cfg_path, root, sorted({m for w in workloads.values() for m in w}),
                    args.quick_profile)
    if args.refresh_start_times:
        wait_quiet(args.max_load, args.max_wait)
        refresh_start_times(cfg_path, root, sorted({m for w in workloads.values() for m in w}))
    words = word_tokens(paths["tiny-a"])
    strategies = args.strategies.split(",")
    results = []
    for wi, (wname, wl) in enumerate(workloads.items()):
        reqs = make_requests(wl, args.data, args.scale, args.seed + wi, words)
        inp = write_jsonl(root / f"{wname}.jsonl", reqs)
        toks = sum(r["body"]["max_tokens"] for r in reqs)
        print(f"\n== {wname}: {dict(wl)}, {len(reqs)} requests, {toks} output tokens", flush=True)
        one_core = wname in ONE_CORE
        wcfg = write_config(root, paths, free_port(), (0,), "one-core.toml") if one_core else cfg_path
        offline = offline_plan(wcfg, inp)
        for line in describe_plan(offline):
            print(line)
        row = {"workload": wname, "models": wl, "requests": len(reqs), "output_tokens": toks,
               "offline_plan": offline, "runs": {}}
        strats = ["samullm"] if len(wl) == 1 else strategies
        # repeats alternate the sides (gateway strategies, then the anchor, again), so that a slow
        # spell of the machine does not fall on one side only; the table shows the median
        for rep in range(args.repeats):
            for s in strats:
                load = wait_quiet(args.max_load, args.max_wait)
                run = run_gateway(wcfg, root, inp, s, reqs, args.timeout, f"{wname}-r{rep}")
                print(f"  {s:<12} measured {run.makespan_s:7.1f} s   predicted "
                      f"{run.predicted_s or float('nan'):7.1f} s   (load avg {load:.2f} at start)",
                      flush=True)
                for line in describe_events(run):
                    print(line)
                add_run(row["runs"], s, {"measured_s": run.makespan_s,
                                         "predicted_s": run.predicted_s,
                                         "lower_bound_s": run.lower_bound_s, "load": load,
                                         "events": run.events})
            if not args.no_anchor:
                load = wait_quiet(args.max_load, args.max_wait)
                total, per = run_anchor(root, paths, reqs, wname, "0" if one_core else "0-1")
                print(f"  run_batch    measured {total:7.1f} s   per model "
                      + ", ".join(f"{m} {t:.1f}s" for m, t in per.items()), flush=True)
                add_run(row["runs"], "run_batch", {"measured_s": total, "per_model_s": per,
                                                   "load": load})
        results.append(row)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
    print()
    for line in table(results):
        print(line)
    return 0


def add_wait_args(ap: argparse.ArgumentParser, timeout_s: float = 300) -> None:
    """The options of every gateway bench for how long a batch may take and when to start one."""
    ap.add_argument("--timeout", type=float, default=timeout_s, help="per batch, seconds")
    ap.add_argument("--max-load", type=float, default=99.0,
                    help="wait (up to --max-wait) until the 1-min load average is below this")
    ap.add_argument("--max-wait", type=float, default=1800)


def add_run(runs: dict, name: str, rec: dict) -> None:
    """Keep every repeat under "repeats"; the row's own fields are the median repeat's."""
    reps = runs.setdefault(name, {"repeats": []})["repeats"]
    reps.append(rec)
    by_time = sorted(reps, key=lambda r: r["measured_s"])
    median = by_time[(len(by_time) - 1) // 2]
    runs[name].update({k: v for k, v in median.items() if k != "events"})
    runs[name]["events"] = median.get("events", [])


def table(results: list[dict]) -> list[str]:
    """The README's Markdown table (rows of `--json` output)."""
    out = ["| workload | strategy | measured s | predicted s | error | bound s | measured / bound "
           "| load | samullm speed-up over it |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results:
        runs = row["runs"]
        ours = runs.get("samullm", {}).get("measured_s")
        models = ", ".join(f"{m} {n}" for m, n in row["models"].items())
        for s, r in runs.items():
            pred = r.get("predicted_s")
            err = f"{(pred - r['measured_s']) / r['measured_s']:+.0%}" if pred else "–"
            speed = f"{r['measured_s'] / ours:.2f}×" if ours and s != "samullm" else "–"
            reps = [x["measured_s"] for x in r.get("repeats", [])]
            measured = f"{r['measured_s']:.1f}" + (
                f" ({', '.join(f'{x:.1f}' for x in reps)})" if len(reps) > 1 else "")
            out.append(f"| {row['workload']} ({models}) | {s} | {measured} | "
                       f"{f'{pred:.1f}' if pred else '–'} | {err} | "
                       f"{bound_cells(r['measured_s'], r.get('lower_bound_s'))} | "
                       f"{r.get('load', 0):.1f} | {speed} |")
    return out


def bound_cells(measured: float | None, bound: float | None) -> str:
    """A makespan table's "bound s | measured / bound" cells: the lower bound of the run's first
    plan event (`lower_bound_s`, `scheduler.bounds`) and how far above it the run ended."""
    if not bound or not measured:
        return "– | –"
    return f"{bound:.1f} | {measured / bound:.2f}×"


def print_table(path: Path) -> int:
    for line in table(json.loads(path.read_text())):
        print(line)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:  # re-print the table of an earlier --json file
        raise SystemExit(print_table(Path(sys.argv[2])))
    raise SystemExit(main())
