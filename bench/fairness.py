"""Many users, one gateway: a small batch behind a big one, with fair queues and in arrival order.

The scene (on `bench.makespan`'s demo models, outputs forced and checked): a big batch of `--big`
requests on `small` (64 tokens out each) is submitted to a gateway whose spare engine processes
are ready; `--delay` seconds later a batch of 5 requests on `small` (16 tokens out). Measured, each
from its own `batches.create` to the poll that sees it `completed`:
- `fair` (`[scheduler] fairness = "fair"`, the default) and `fifo` (arrival order): the small
  batch's and the big batch's completion, and the pool's makespan (first create to last done);
- alone: the small batch on the same gateway right after (its engine still warm, nothing else
  queued), and the big batch by itself on a fresh gateway.
Targets (the issue): the small batch within 2x its alone time; the big batch at most 5 % slower
than alone; the pool's makespan at most 3 % worse than in arrival order.

    .venv/bin/python -m bench.fairness --data ../shared/data --skip-profiles [--big 800]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import makespan as mk  # noqa: E402

CHAT = "/v1/chat/completions"


def requests(tag: str, n: int, out_tokens: int, words: list[str], seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"custom_id": f"{tag}-{i}", "method": "POST", "url": CHAT,
             "body": {"model": "small", "max_tokens": out_tokens, "ignore_eos": True,
                      "temperature": 1.0, "messages": [{"role": "user", "content": " ".join(
                          words[j] for j in rng.integers(0, len(words), 32))}]}}
            for i in range(n)]


def timed(client: Any, file_id: str, reqs: list[dict], what: str, out: dict) -> None:
    """Create a batch of `file_id`, wait for it, check it; `out` gets its start and end."""
    out["start"] = time.monotonic()
    batch = mk.run_to_end(client, file_id, None, 900, what)
    out["end"] = time.monotonic()
    mk.check_output(client.files.content(batch.output_file_id).text, reqs, what)


def upload(client: Any, path: Path) -> str:
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="batch").id


def scene(cfg: Path, root: Path, tag: str, big: list[dict], small: list[dict], delay_s: float,
          alone_small: bool) -> dict:
    with mk.serving(cfg, root, tag, "samullm") as (client, _log):
        big_id = upload(client, mk.write_jsonl(root / f"fair-{tag}-big.jsonl", big))
        small_id = upload(client, mk.write_jsonl(root / f"fair-{tag}-small.jsonl", small))
        b: dict = {}
        s: dict = {}
        t = threading.Thread(target=timed, args=(client, big_id, big, "big", b))
        t.start()
        time.sleep(delay_s)
        timed(client, small_id, small, "small", s)
        t.join()
        rec = {"big_s": b["end"] - b["start"], "small_s": s["end"] - s["start"],
               "makespan_s": max(b["end"], s["end"]) - b["start"]}
        if alone_small:  # the engine is warm, nothing else queued
            a: dict = {}
            timed(client, small_id, small, "small alone", a)
            rec["small_alone_s"] = a["end"] - a["start"]
    return rec


def big_alone(cfg: Path, root: Path, big: list[dict]) -> float:
    with mk.serving(cfg, root, "big-alone", "samullm") as (client, _log):
        b: dict = {}
        timed(client, upload(client, mk.write_jsonl(root / "fair-alone-big.jsonl", big)), big,
              "big alone", b)
    return b["end"] - b["start"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--root", type=Path, default=REPO / ".samullm" / "bench-makespan")
    ap.add_argument("--big", type=int, default=800)
    ap.add_argument("--delay", type=float, default=8.0)
    ap.add_argument("--skip-profiles", action="store_true")
    ap.add_argument("--quick-profile", action="store_true")
    ap.add_argument("--max-load", type=float, default=1.5)
    ap.add_argument("--max-wait", type=float, default=900)
    args = ap.parse_args(argv)
    root = args.root.resolve()
    (root / "logs").mkdir(parents=True, exist_ok=True)
    (root / "runs").mkdir(parents=True, exist_ok=True)
    paths = mk.write_models(root)
    fair_cfg = mk.write_config(root, paths, mk.free_port())
    fifo_cfg = root / "fifo.toml"
    fifo_cfg.write_text(fair_cfg.read_text() + '\n[scheduler]\nfairness = "fifo"\n')
    if not args.skip_profiles:
        mk.ensure_profiles(fair_cfg, root, ["small"], args.quick_profile)
    words = mk.word_tokens(paths["tiny-a"])
    big, small = requests("big", args.big, 64, words, 1), requests("small", 5, 16, words, 2)
    out: dict[str, Any] = {"big_requests": args.big, "delay_s": args.delay}
    for name, cfg in (("fair", fair_cfg), ("fifo", fifo_cfg)):
        load = mk.wait_quiet(args.max_load, args.max_wait)
        out[name] = scene(cfg, root, name, big, small, args.delay, alone_small=name == "fair")
        out[name]["load"] = load
        print(f"  {name}: {json.dumps({k: round(v, 1) for k, v in out[name].items()})}", flush=True)
    load = mk.wait_quiet(args.max_load, args.max_wait)
    out["big_alone_s"] = big_alone(fair_cfg, root, big)
    print(f"  big alone: {out['big_alone_s']:.1f} s (load {load:.2f})", flush=True)
    (root / "fairness.json").write_text(json.dumps(out, indent=1))
    for line in table(out):
        print(line)
    return 0


def table(out: dict) -> list[str]:
    alone_small, alone_big = out["fair"]["small_alone_s"], out["big_alone_s"]
    rows = ["| queue order | small batch s | vs alone | big batch s | vs alone | pool makespan s |",
            "|---|---:|---:|---:|---:|---:|"]
    for name in ("fair", "fifo"):
        r = out[name]
        rows.append(f"| {name} | {r['small_s']:.1f} | {r['small_s'] / alone_small:.2f}× | "
                    f"{r['big_s']:.1f} | {r['big_s'] / alone_big:.2f}× | {r['makespan_s']:.1f} |")
    rows.append(f"| alone | {alone_small:.1f} | – | {alone_big:.1f} | – | – |")
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
