"""`samullm plan`: predict the stages and makespan of a batch input under every strategy, offline.

    samullm plan INPUT.jsonl [...] --config C [--devices auto|cpu:N|a100x8-nvlink-pairs|h100x8]
        [--strategy samullm|sequential|even-split|per-model-best|muxserve-greedy|all]
        [--json] [--gantt OUT.png|OUT.svg] [--seed N] [--samples N]

No engine is started. Prompt lengths come from the JSONL bodies (the model's `tokenizer.json` when
it has a path, else characters / 4); output caps from `max_tokens` (else the context left); output
lengths are drawn from the learned length model under the state dir (else the shipped prior).
The plan is made on draw 0; every strategy's schedule is then replayed on `--samples` draws for the
makespan's mean and spread. Latency: GPU pools use the committed A100/H100 profiles
(`scheduler.gpu_profiles`); CPU pools a measured profile under `<state_dir>/profiles/*.json`, else
the analytic roofline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from runtime.config import Config, ConfigError, load_config
from runtime.devices import max_threads, start_contention
from runtime.lengths_store import load_length_model
from runtime.replan import DEFAULT_CPU_LOAD_S, kv_bytes_fn, model_specs
from scheduler.latency import LatencyModel, Profile, analytic_latency_model, assumed_threads_latency
from scheduler.planner import STRATEGIES, Planner, PlanningProblem
from scheduler.types import DevicePool, ModelSpec, Schedule
from scheduler.workloads import RequestShape, makespan_stats, sample_workloads

GiB = 1024**3
GPU_MEMORY_GIB = {"a100": 80, "h100": 80}
_PRESET = re.compile(r"^(a100|h100)x(\d+)(-nvlink-pairs)?$")


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT.jsonl", help="OpenAI batch input file(s)")
    p.add_argument("--config", default="conf/default.toml")
    p.add_argument("--devices", default="auto",
                   help="auto (from the config) | cpu:N | a100xN[-nvlink-pairs] | h100xN")
    p.add_argument("--gpu", default="a100", choices=("a100", "h100"),
                   help="GPU profiles for --devices auto with a cuda config")
    p.add_argument("--strategy", default="all", choices=STRATEGIES + ("all",))
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--gantt", default=None, metavar="OUT", help="write a Gantt chart (.png or .svg)")
    p.add_argument("--seed", type=int, default=None, help="length-sampling seed (default: config)")
    p.add_argument("--samples", type=int, default=None,
                   help="output-length draws for the makespan estimate (default: config)")
    p.add_argument("--top-k", type=int, default=None, help="search width (default: config)")


# ---------------------------------------------------------------------------------------------
# inputs

def _text_of(body: dict[str, Any]) -> str:
    if "messages" in body:
        parts = []
        for msg in body.get("messages") or []:
            content = msg.get("content") if isinstance(msg, dict) else None
            if isinstance(content, list):  # content parts: keep the text ones
                content = " ".join(c.get("text", "") for c in content if isinstance(c, dict))
            parts.append(str(content or ""))
        return "\n".join(parts)
    value = body.get("prompt", body.get("input", ""))
    return value if isinstance(value, str) else json.dumps(value)


class PromptCounter:
    """Tokens of a request's prompt: the model's tokenizer.json when it has weights, else chars/4."""

    PER_MESSAGE = 4  # role/separator tokens a chat template adds per message

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.tokenizers: dict[str, Any] = {}

    def _tokenizer(self, model: str) -> Any:
        if model not in self.tokenizers:
            tok = None
            m = self.cfg.model(model)
            path = m.resolved_path(self.cfg.base_dir) if m else None
            if path is not None and (path / "tokenizer.json").exists():
                try:
                    from tokenizers import Tokenizer

                    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
                except Exception:  # unreadable tokenizer: estimate instead of failing the plan
                    tok = None
            self.tokenizers[model] = tok
        return self.tokenizers[model]

    def count(self, model: str, body: dict[str, Any]) -> int:
        text = _text_of(body)
        tok = self._tokenizer(model)
        n = len(tok.encode(text).ids) if tok is not None else -(-len(text) // 4)
        if "messages" in body:
            n += self.PER_MESSAGE * len(body.get("messages") or [])
        return max(1, n)


def read_requests(paths: list[str], cfg: Config, specs: dict[str, ModelSpec]
                  ) -> dict[str, list[RequestShape]]:
    """RequestShapes per model from batch input files; unknown models are a ConfigError."""
    counter = PromptCounter(cfg)
    out: dict[str, list[RequestShape]] = {}
    unknown: set[str] = set()
    rid = 0
    for path in paths:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read input {path}: {exc}") from exc
        for no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                body, url = obj["body"], obj.get("url", "/v1/chat/completions")
                model = body["model"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{path}:{no}: not a batch request line ({exc})") from exc
            if model not in specs:
                unknown.add(str(model))
                continue
            spec = specs[model]
            prompt = min(counter.count(model, body), spec.max_model_len - 1)
            room = spec.max_model_len - prompt
            cap = body.get("max_completion_tokens", body.get("max_tokens"))
            cap = room if not isinstance(cap, int) or cap <= 0 else min(cap, room)
            out.setdefault(model, []).append(RequestShape(rid, prompt, max(1, cap), url))
            rid += 1
    if unknown:
        raise ConfigError(f"input names model(s) not in the config: {', '.join(sorted(unknown))}")
    return out


# ---------------------------------------------------------------------------------------------
# devices and latency

@dataclass(frozen=True)
class Devices:
    pool: DevicePool
    gpu: str | None  # "a100" / "h100" profiles, None on CPU


def resolve_devices(spec: str, cfg: Config, gpu: str = "a100") -> Devices:
    """`auto` reads [devices] of the config (cuda configs use `gpu`'s profiles). The pool's start
    contention is `[devices] start_contention`, else its kind's default (`runtime.devices`)."""
    dev = _resolve_devices(spec, cfg, gpu)
    beta = start_contention(cfg, dev.pool.kind)
    threads = max_threads(cfg, dev.pool.count) if dev.pool.kind == "cpu" else 1
    pool = dataclasses.replace(dev.pool, start_contention=beta, max_threads=threads)
    return Devices(pool, dev.gpu)


def _resolve_devices(spec: str, cfg: Config, gpu: str) -> Devices:
    m = _PRESET.match(spec)
    if m:
        kind, n = m.group(1), int(m.group(2))
        ids = tuple(range(n))
        groups = tuple(ids[i:i + 2] for i in range(0, n, 2)) if m.group(3) else ()
        return Devices(DevicePool(kind, ids, GPU_MEMORY_GIB[kind] * GiB, groups), kind)
    if spec.startswith("cpu:"):
        try:
            n = int(spec[4:])
        except ValueError:
            raise ConfigError(f"--devices {spec}: expected cpu:N") from None
        return Devices(DevicePool("cpu", tuple(range(n)), int(cfg.devices.cpu_kvcache_gib * GiB)), None)
    if spec != "auto":
        raise ConfigError(f"--devices {spec}: one of auto, cpu:N, a100xN[-nvlink-pairs], h100xN")
    d = cfg.devices
    groups = tuple(tuple(g) for g in d.topology_groups)
    if d.kind == "cuda":
        ids = tuple(d.ids) or tuple(sorted(i for g in groups for i in g))
        if not ids:
            raise ConfigError("devices.ids: a cuda config needs ids (or topology_groups) to plan")
        mem = d.memory_gib or GPU_MEMORY_GIB[gpu]
        return Devices(DevicePool(gpu, ids, int(mem * GiB), groups), gpu)
    ids = tuple(d.ids) or tuple(sorted(os.sched_getaffinity(0)))
    return Devices(DevicePool("cpu", ids, int(d.cpu_kvcache_gib * GiB), groups), None)


def cpu_profiles(state_dir: Path) -> dict[tuple, LatencyModel]:
    """Measured CPU profiles under `<state_dir>/profiles/*.json`, by (model, tp), or
    (model, tp, threads) for ranks on several cores."""
    table: dict[tuple, LatencyModel] = {}
    for f in sorted((state_dir / "profiles").glob("*.json")):
        try:
            prof = Profile.from_dict(json.loads(f.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if prof.device == "cpu":
            threads = (prof.threads,) if prof.threads > 1 else ()
            table[(prof.model, prof.tp) + threads] = prof.latency
    return table


def latency_fn(devices: Devices, cfg: Config) -> Callable[[ModelSpec, int], LatencyModel]:
    if devices.gpu is not None:
        from scheduler.gpu_profiles import gpu_latency_model, gpu_load_time_s

        gpu = devices.gpu

        def gpu_lat(spec: ModelSpec, tp: int) -> LatencyModel:
            lat = gpu_latency_model(spec, tp, gpu)
            return lat if lat.load_time_s > 0 else lat.with_load_time(gpu_load_time_s(spec, tp, gpu))

        return gpu_lat
    table = cpu_profiles(cfg.state_dir)

    def cpu_lat(spec: ModelSpec, tp: int) -> LatencyModel:
        lat = table.get((spec.name, tp)) or analytic_latency_model(spec, tp, "cpu")
        return lat if lat.load_time_s > 0 else lat.with_load_time(DEFAULT_CPU_LOAD_S)

    return cpu_lat


def threads_latency_fn(devices: Devices, cfg: Config
                       ) -> Callable[[ModelSpec, int, int], LatencyModel] | None:
    """CPU ranks on several cores: the measured profile of that shape, else the assumed speed-up
    over threads = 1 (as the runtime's `LatencySource.threads`); None on GPUs."""
    if devices.gpu is not None:
        return None
    table, one = cpu_profiles(cfg.state_dir), latency_fn(devices, cfg)

    def threads_lat(spec: ModelSpec, tp: int, threads: int) -> LatencyModel:
        base = one(spec, tp)
        hit = table.get((spec.name, tp, threads))
        return (assumed_threads_latency(base, threads) if hit is None
                else hit.with_load_time(base.load_time_s))

    return threads_lat


# ---------------------------------------------------------------------------------------------
# output

def stage_rows(s: Schedule) -> list[dict[str, Any]]:
    return [{"start_s": round(st.start_s, 3), "end_s": round(st.end_s, 3),
             "finished": st.finished, "restarts": st.restarts,
             "plans": [{"model": p.model, "tp": p.tp, "dp": p.dp, "devices": list(p.devices)}
                       | ({"threads": p.threads} if p.threads > 1 else {})
                       for p in st.plans]} for st in s.stages]


def _fmt_s(x: float) -> str:
    return f"{x:,.1f}s" if x < 3600 else f"{x / 3600:,.2f}h"


def render_text(result: dict[str, Any]) -> str:
    lines = [f"devices: {result['devices']}   requests: {result['requests']}   "
             f"samples: {result['samples']}   planning: {result['planning_time_s']:.2f}s"]
    strategies = result["strategies"]
    for name, s in strategies.items():
        origin = f" (stages of {s['origin'][9:]})" if s["origin"].startswith("baseline:") else ""
        lines.append(f"\n== {name}{origin}: predicted makespan {_fmt_s(s['makespan_s'])}")
        for i, st in enumerate(s["stages"], 1):
            plans = ", ".join(f"{p['model']} TP{p['tp']}xDP{p['dp']}"
                              + (f"x{p['threads']}threads" if p.get("threads", 1) > 1 else "")
                              + f" @{_ids(p['devices'])}"
                              for p in st["plans"])
            lines.append(f"  stage {i}: {_fmt_s(st['start_s'])} -> {_fmt_s(st['end_s'])}  {plans}"
                         f"  | done: {', '.join(st['finished'])}"
                         + (f"  | (re)start: {', '.join(st['restarts'])}" if st["restarts"] else ""))
    lines.append("")
    ref = strategies.get("samullm")
    head = f"{'strategy':<17}{'makespan':>12}{'mean ± std over draws':>28}{'samullm speedup':>17}"
    lines += [head, "-" * len(head)]
    for name, s in strategies.items():
        st = s["samples"]
        spread = f"{_fmt_s(st['mean_s'])} ± {_fmt_s(st['std_s'])}"
        speed = f"{s['makespan_s'] / ref['makespan_s']:.2f}x" if ref and ref["makespan_s"] > 0 else "-"
        lines.append(f"{name:<17}{_fmt_s(s['makespan_s']):>12}{spread:>28}{speed:>17}")
    return "\n".join(lines)


def _ids(ids: list[int]) -> str:
    return ",".join(map(str, ids))


def plan_main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    seed = cfg.scheduler.seed if args.seed is None else args.seed
    samples = max(1, cfg.scheduler.samples if args.samples is None else args.samples)
    top_k = cfg.scheduler.top_k if args.top_k is None else args.top_k
    specs = model_specs(cfg)
    shapes = read_requests(args.inputs, cfg, specs)
    if not shapes:
        print("samullm plan: no requests in the input", file=sys.stderr)
        return 1
    devices = resolve_devices(args.devices, cfg, args.gpu)
    draws = sample_workloads(shapes, load_length_model(cfg.state_dir), samples, seed)
    problem = PlanningProblem({m: specs[m] for m in shapes}, draws[0], devices.pool,
                              latency_fn(devices, cfg), kv_bytes_fn(cfg, devices.pool),
                              top_k=top_k, seed=seed,
                              threads_latency=threads_latency_fn(devices, cfg))
    names = STRATEGIES if args.strategy == "all" else (args.strategy,)
    planner = Planner(problem)
    t0 = time.perf_counter()
    scheds = {n: planner.plan(n) for n in names}
    planning = time.perf_counter() - t0
    result = {
        "devices": f"{devices.pool.count}x {devices.pool.kind}"
                   + (f" groups {list(map(list, devices.pool.groups))}" if devices.pool.groups else ""),
        "start_contention": devices.pool.start_contention,
        "requests": sum(len(v) for v in shapes.values()),
        "samples": samples, "seed": seed, "planning_time_s": planning,
        "strategies": {n: {"makespan_s": s.makespan_s, "origin": s.origin,
                           "samples": makespan_stats(planner, s, draws).to_dict(),
                           "stages": stage_rows(s)} for n, s in scheds.items()},
    }
    if "samullm" in scheds:
        ref = scheds["samullm"].makespan_s
        result["speedup_of_samullm"] = {n: (s.makespan_s / ref if ref > 0 else None)
                                        for n, s in scheds.items() if n != "samullm"}
    if args.gantt:
        from runtime.gantt import write_gantt

        write_gantt(scheds, devices.pool, args.gantt)
    print(json.dumps(result, indent=2) if args.json else render_text(result))
    return 0
