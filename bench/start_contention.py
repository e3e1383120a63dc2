"""Engine start contention on this machine: one engine started alone, then n started at once.

The planner charges each of n engines started in the same stage `load × (1 + β·(n − 1))`
(`scheduler.contention`); this measures β for CPU pools. A start is the time from spawning the
api_server (`runtime.engines.engine.Engine`, as the executor launches it) to a healthy /health; the
concurrent engines get one core each (cores 0, 1, ...). β = (mean concurrent start / alone start
− 1) / (n − 1). The load average is printed with the figures: other work on the machine slows
starts too, and β is only meaningful against the load it was measured under.

Run it under the engine mutex (it starts real engines):

    flock /tmp/samullm-engines.lock .venv/bin/python -m bench.start_contention [--model-dir DIR]
        [--engines 2] [--repeats 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from runtime.config import ModelConfig
from runtime.engines.engine import Engine, EngineSpec

REPO = Path(__file__).resolve().parent.parent
# the `small` test model (tests/conftest.py) with the makespan bench's engine limits
SMALL = dict(layers=4, hidden=256, heads=4, kv_heads=2, seed=2)
MAX_MODEL_LEN, MAX_SEQS, MAX_BATCHED, KV_GIB = 1024, 32, 1024, 0.25


def ensure_model(path: Path) -> Path:
    if not (path / "config.json").exists():
        from tools.tinymodel import write_tiny_model

        write_tiny_model(path, **SMALL)
    return path


def spec_for(path: Path, cores: tuple[int, ...], log_dir: Path, tag: str) -> EngineSpec:
    mc = ModelConfig(name="small", path=str(path), max_model_len=MAX_MODEL_LEN,
                     max_num_seqs=MAX_SEQS, max_num_batched_tokens=MAX_BATCHED,
                     engine_args={"enforce_eager": True})
    return EngineSpec(model=mc, model_path=path, devices=cores, device_kind="cpu", tp=1,
                      kv_cache_gib=KV_GIB, log_path=log_dir / f"start-{tag}.log")


async def start_times(specs: list[EngineSpec], timeout_s: float = 600) -> list[float]:
    """Start every spec at once; their start times (each engine's own spawn → healthy)."""
    engines = [Engine(s) for s in specs]
    try:
        await asyncio.gather(*(e.start(timeout_s) for e in engines))
        return [float(e.start_time_s) for e in engines]  # type: ignore[arg-type]
    finally:
        await asyncio.gather(*(e.stop() for e in engines), return_exceptions=True)


def implied_beta(alone_s: float, concurrent_s: list[float]) -> float:
    """β from one alone start and the starts of n engines started together."""
    n = len(concurrent_s)
    if n < 2 or alone_s <= 0:
        raise ValueError("need an alone start > 0 and at least two concurrent starts")
    return (sum(concurrent_s) / n / alone_s - 1.0) / (n - 1)


async def main_async(args: argparse.Namespace) -> int:
    path = ensure_model(Path(args.model_dir).resolve())
    log_dir = Path(args.log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < args.engines:
        print(f"need {args.engines} cores, have {cores}", file=sys.stderr)
        return 2
    betas = []
    for rep in range(args.repeats):
        load0 = os.getloadavg()[0]
        alone = (await start_times([spec_for(path, (cores[0],), log_dir, f"alone-{rep}")]))[0]
        load1 = os.getloadavg()[0]
        together = await start_times([spec_for(path, (cores[i],), log_dir, f"conc{i}-{rep}")
                                      for i in range(args.engines)])
        load2 = os.getloadavg()[0]
        beta = implied_beta(alone, together)
        betas.append(beta)
        print(f"repeat {rep}: alone {alone:.1f} s (load {load0:.2f}); {args.engines} at once "
              + ", ".join(f"{t:.1f}" for t in together)
              + f" s (load {load1:.2f} -> {load2:.2f}); beta = {beta:.3f}", flush=True)
    print(f"beta mean over {len(betas)} repeat(s): {sum(betas) / len(betas):.3f} "
          f"(load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", default=str(REPO / ".samullm" / "test-models" / "small"))
    ap.add_argument("--log-dir", default=str(REPO / ".samullm" / "bench-start-contention"))
    ap.add_argument("--engines", type=int, default=2, help="engines started at once (one core each)")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
