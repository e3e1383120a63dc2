"""Derive the shipped output-length prior from the real request traces.

    python bench/derive_length_prior.py --data ../shared/data

Reads the three trace CSVs under `<data>/traces/` (microsoft/vidur `data/processed_traces`, MIT: the
Azure LLM inference trace 2023 conversation and code services, and arXiv summarization with the
Llama-2 tokenizer) and writes `scheduler/data/length_prior.json`: per trace, quantiles of decode
(output) and prefill (prompt) tokens at the mid-points of `LEVELS` equal-probability bins, so each
quantile stands for 1/LEVELS of the requests. Only this derived table is committed, never the CSVs.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

LEVELS = 200
TRACES = {  # name used by scheduler.lengths -> file under traces/
    "conversation": "splitwise_conv.csv",
    "code": "splitwise_code.csv",
    "arxiv": "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv",
}
OUT = Path(__file__).resolve().parent.parent / "scheduler" / "data" / "length_prior.json"


def quantiles(values: np.ndarray) -> list[int]:
    levels = (np.arange(LEVELS) + 0.5) / LEVELS
    return [int(round(v)) for v in np.quantile(values, levels, method="linear")]


def summarise(path: Path) -> dict:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    dec = np.array([int(float(r["num_decode_tokens"])) for r in rows])
    pre = np.array([int(float(r["num_prefill_tokens"])) for r in rows])
    return {
        "file": f"traces/{path.name}",
        "requests": len(rows),
        "decode": {"mean": round(float(dec.mean()), 1), "median": float(np.median(dec)),
                   "p99": float(np.quantile(dec, 0.99)), "max": int(dec.max()),
                   "quantiles": quantiles(dec)},
        "prefill": {"mean": round(float(pre.mean()), 1), "median": float(np.median(pre)),
                    "max": int(pre.max()), "quantiles": quantiles(pre)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--data", default="../shared/data", help="the shared reference data directory")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    table = {
        "source": "microsoft/vidur data/processed_traces (MIT), read from <data>/traces/ by "
                  "bench/derive_length_prior.py",
        "levels": LEVELS,
        "level_points": "quantile i is at probability (i + 0.5) / levels",
        "traces": {name: summarise(Path(args.data) / "traces" / fname)
                   for name, fname in TRACES.items()},
    }
    Path(args.out).write_text(json.dumps(table, separators=(",", ":")) + "\n")
    for name, t in table["traces"].items():
        d = t["decode"]
        print(f"{name:13s} {t['requests']:6d} requests  decode mean {d['mean']:7.1f}  "
              f"median {d['median']:6.0f}  p99 {d['p99']:6.0f}  max {d['max']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
