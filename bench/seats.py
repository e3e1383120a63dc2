"""A small batch on an engine a big batch saturates: what each way of making room costs each batch.

One real `small` engine (the demo model of `bench.demo_setup`), started by the gateway's own launcher
on one core at the engines' niceness, 32 seats. A big batch of `--big` 64-token requests is kept 48
in flight (the gateway's `slots.limit`) at priority 9, an aborted one sent again at the head, as
the gateway re-queues it; 4 s in, a small batch of 20 requests of 16 tokens (priority 0) is sent
and timed to its last answer, and the big batch to its last. Scenarios:
- `alone`: the small batch on the idle engine; `big-alone`: the big batch with no small one;
- `priority`: the big batch's requests left as they are (vLLM admits the small ones as seats
  free up, best priority first);
- `abort-20`: 20 of its running ones aborted (the last sent, standing in for the last admitted):
  the gateway's first preemption, one per small request;
- `hold`: all 48 aborted and none sent until the small batch is done: what
  `runtime.executor.seats` does now.
Each scenario `--repeats` times in turn; requests go through `Engine.post`, whose cancellation
closes the connection and makes vLLM abort the request, as in the gateway. The table: the small
batch's time against `alone`, and the big batch's against `big-alone` (what making room cost it,
the small batch's own work included).

    .venv/bin/python -m bench.seats [--repeats 3] [--core 1] [--big 400]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import demo_setup as setup  # noqa: E402
from runtime.config import DEFAULT_CPU_ENGINE_NICE, parse_config  # noqa: E402
from runtime.engines.engine import Engine, EngineSpec, VllmLauncher  # noqa: E402
from runtime.executor.slots import INFLIGHT_FACTOR  # noqa: E402

SCENARIOS = ("alone", "big-alone", "priority", "abort-20", "hold")


def body(words: list[str], i: int, tokens: int, priority: int) -> dict:
    text = " ".join(words[(i * 7 + k) % len(words)] for k in range(40))
    return {"model": "small", "messages": [{"role": "user", "content": text}],
            "max_tokens": tokens, "min_tokens": tokens, "ignore_eos": True, "temperature": 0,
            "priority": priority}


async def small_batch(engine: Engine, words: list[str]) -> float:
    t0 = time.monotonic()
    got = await asyncio.gather(*(engine.post(setup.CHAT, body(words, 1000 + i, 16, 0)) for i in range(20)))
    assert all(status == 200 for status, _ in got), got[:1]
    return time.monotonic() - t0


async def scenario(engine: Engine, words: list[str], name: str, seats: int, n_big: int
                   ) -> tuple[float | None, float | None]:
    """(the small batch's time, the big batch's) under `name`; None where that batch is not run."""
    if name == "alone":
        return await small_batch(engine, words), None
    limit = int(INFLIGHT_FACTOR * seats)
    todo = list(range(n_big))  # the big batch's requests not answered nor in flight, in order
    inflight: dict[asyncio.Task, int] = {}  # in send order
    sending = asyncio.Event()
    sending.set()
    t0 = time.monotonic()

    def answered(task: asyncio.Task) -> None:
        k = inflight.pop(task, None)
        if k is not None and (task.cancelled() or task.result()[0] != 200):
            todo.insert(0, k)  # aborted (or failed): sent again, as the gateway re-queues it

    async def feed() -> None:
        while todo or inflight:
            while todo and len(inflight) < limit and sending.is_set():
                k = todo.pop(0)
                task = asyncio.create_task(engine.post(setup.CHAT, body(words, k, 64, 9)))
                inflight[task] = k
                task.add_done_callback(answered)
            await asyncio.sleep(0.005)

    feeder = asyncio.create_task(feed())
    small_s = None
    if name != "big-alone":
        await asyncio.sleep(4.0)  # saturated
        live = list(inflight)
        if name == "abort-20":
            for t in live[:seats][-20:]:
                t.cancel()
        elif name == "hold":
            sending.clear()
            for t in live:
                t.cancel()
        small_s = await small_batch(engine, words)
        sending.set()
    await feeder
    big_s = time.monotonic() - t0
    await asyncio.sleep(1.0)  # the aborts reached the engine before the next scenario
    return small_s, big_s


async def run(repeats: int, core: int, n_big: int) -> dict:
    root = REPO / ".samullm" / "bench-makespan"
    paths = setup.write_models(root)
    words = setup.word_tokens(paths["tiny-a"])
    cfg = parse_config({"server": {"state_dir": str(root / "state")},
                        "devices": {"kind": "cpu", "cpu_kvcache_gib": setup.KV_GIB},
                        "models": [{"name": "small", "path": str(paths["small"]),
                                    "dtype": "float32", "max_model_len": setup.MAX_MODEL_LEN,
                                    "max_num_seqs": setup.MAX_SEQS,
                                    "max_num_batched_tokens": setup.MAX_BATCHED,
                                    "engine_args": dict(setup.ENGINE_ARGS)}]})
    mc = cfg.model("small")
    spec = EngineSpec(model=mc, model_path=paths["small"], devices=(core,),
                      kv_cache_gib=setup.KV_GIB, nice=DEFAULT_CPU_ENGINE_NICE,
                      log_path=root / "logs" / "bench-seats.log")
    launcher = VllmLauncher(log_dir=root / "logs")
    await launcher.start()
    out: dict[str, list[tuple[float | None, float | None]]] = {s: [] for s in SCENARIOS}
    try:
        engine = await launcher.launch(spec)
        try:
            await small_batch(engine, words)  # warm
            for _ in range(repeats):
                for name in SCENARIOS:
                    got = await scenario(engine, words, name, mc.max_num_seqs, n_big)
                    out[name].append(got)
                    print(f"  {name}: " + ", ".join(
                        f"{what} {v:.3f} s" for what, v in zip(("small", "big"), got)
                        if v is not None), flush=True)
        finally:
            await engine.stop()
    finally:
        await launcher.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--core", type=int, default=1)
    ap.add_argument("--big", type=int, default=400, help="the big batch's requests")
    args = ap.parse_args(argv)
    out = asyncio.run(run(args.repeats, args.core, args.big))
    med = {name: [statistics.median(v) if (v := [r[i] for r in runs if r[i] is not None]) else None
                  for i in (0, 1)] for name, runs in out.items()}
    alone, big_alone = med["alone"][0], med["big-alone"][1]
    print("\n| scenario | small batch s (runs) | median | vs alone | big batch s (median) "
          "| big vs big alone |\n|---|---|---:|---:|---:|---:|")
    for name, runs in out.items():
        small, big = med[name]
        cells = [", ".join(f"{r[0]:.2f}" for r in runs) if small is not None else "–",
                 f"{small:.2f}" if small is not None else "–",
                 f"{small / alone:.2f}×" if small is not None else "–",
                 f"{big:.2f}" if big is not None else "–",
                 f"+{big - big_alone:.2f} s" if big is not None else "–"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
