"""What every gateway bench sets up: the demo models (random weights, `samullm tiny-model`), a
gateway config for them on this machine's cores, their measured latency profiles, and requests
for them with lengths from the real conversation trace (or the shipped prior tables)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
import time
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


# ---------------------------------------------------------------------------------------------
# setup: models, config, profiles

def prepare(root: Path) -> tuple[Path, dict[str, Path]]:
    """A bench's root, resolved, with its `logs/` and `runs/` made, and the demo models written
    under it (once: a model already there is kept); returns (root, model name -> its path)."""
    root = root.resolve()
    for d in ("logs", "runs"):
        (root / d).mkdir(parents=True, exist_ok=True)
    return root, write_models(root)


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
