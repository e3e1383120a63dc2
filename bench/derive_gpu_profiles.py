"""Fit GPU per-iteration latency coefficients from real per-operator timings.

    python bench/derive_gpu_profiles.py --data ../shared/data

Source: `<data>/gpu-profiles/compute/{a100,h100}/<org>/<model>/mlp.csv` (one transformer layer's
token-level operators, ms, by num_tokens and TP) and `<data>/gpu-profiles/network/*/all_reduce.csv`
(all-reduce ms by message bytes and workers), both from microsoft/vidur (MIT).

Per (GPU, TP) one scaling for every model, so it generalises to architectures not in the data:

    layer_ms(N) = k0 + kw·U + kf·U·N + ke·E·N

U = linear-layer weights per rank per layer (h·(h+2·kv) + h·h + h·I·(2 gated | 1) + I·h) / TP: kw
is reading them (the memory-bound floor of small batches), kf their GEMM work per token; E = h + I/TP
elements per token for norms, rotary, activation and residual adds. Fitted by NNLS on relative
error. All-reduce: ms = a + b·bytes per (topology, workers), from the intra-node rows. Writes
`scheduler/data/gpu_coeffs.json` and prints the fit error per model in the data.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

OPS = ("input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
       "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")
TOPOLOGY = {"a100": "a100_dgx", "h100": "h100_dgx"}  # NVSwitch servers; pairwise kept for reference
OUT = Path(__file__).resolve().parent.parent / "scheduler" / "data" / "gpu_coeffs.json"


def layer_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def dims(r: dict, tp: int) -> tuple[float, float]:
    h, i = int(r["n_embd"]), int(r["n_expanded_embd"])
    kv = h // int(r["n_head"]) * int(r["n_kv_head"])
    up = 2 if r["use_gated_mlp"] == "True" else 1
    u = (h * (h + 2 * kv) + h * h + h * i * up + i * h) / tp
    return u, h + i / tp


def features(u: float, e: float, n: int) -> list[float]:
    return [1.0, u, u * n, e * n]


def fit_compute(data: Path, gpu: str) -> tuple[dict, list[str]]:
    by_tp: dict[int, list[tuple[str, list[float], float]]] = {}
    for path in sorted((data / "gpu-profiles" / "compute" / gpu).glob("*/*/mlp.csv")):
        model = f"{path.parent.parent.name}/{path.parent.name}"
        for r in layer_rows(path):
            tp, n = int(r["num_tensor_parallel_workers"]), int(r["num_tokens"])
            if n > 8192:  # beyond any max_num_batched_tokens we plan with
                continue
            ms = sum(float(r.get(f"time_stats.{op}.median") or 0.0) for op in OPS)  # phi-2: no 2nd norm
            u, e = dims(r, tp)
            by_tp.setdefault(tp, []).append((model, features(u, e, n), ms))
    coeffs, report = {}, []
    for tp, rows in sorted(by_tp.items()):
        x = np.array([f for _, f, _ in rows])
        y = np.array([ms for _, _, ms in rows])
        xw, yw = x / y[:, None], np.ones_like(y)
        scale = np.linalg.norm(xw, axis=0)
        k, _ = nnls(xw / scale, yw)
        k = k / scale
        coeffs[str(tp)] = {"k0_ms": k[0], "kw_ms_per_weight": k[1], "kf_ms_per_weight_token": k[2],
                           "ke_ms_per_elem_token": k[3]}
        err = x @ k / y - 1
        for model in sorted({m for m, _, _ in rows}):
            sel = np.array([m == model for m, _, _ in rows])
            e = np.abs(err[sel])
            report.append(f"{gpu} tp={tp} {model:40s} rows {sel.sum():4d}  median |err| "
                          f"{np.median(e):6.1%}  max {e.max():6.1%}")
    return coeffs, report


def fit_allreduce(data: Path, topo: str) -> dict:
    rows = layer_rows(data / "gpu-profiles" / "network" / topo / "all_reduce.csv")
    out = {}
    for w in sorted({int(r["num_workers"]) for r in rows}):
        sel = [r for r in rows if int(r["num_workers"]) == w and int(r["devices_per_node"]) == w
               and int(r["size"]) <= 256 * 2**20]
        if len(sel) < 2:
            continue
        size = np.array([float(r["size"]) for r in sel])
        ms = np.array([float(r["time_stats.all_reduce.median"]) for r in sel])
        x = np.stack([np.ones_like(size), size], axis=1) / ms[:, None]
        scale = np.linalg.norm(x, axis=0)
        k, _ = nnls(x / scale, np.ones_like(ms))
        k = k / scale
        out[str(w)] = {"a_ms": k[0], "b_ms_per_byte": k[1],
                       "median_rel_err": float(np.median(np.abs(x @ k - 1)))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    data = Path(args.data)
    table: dict = {
        "source": "microsoft/vidur data/profiling (MIT): <data>/gpu-profiles/compute/*/*/*/mlp.csv "
                  "and network/*/all_reduce.csv, fitted by bench/derive_gpu_profiles.py",
        "layer_model": "layer_ms(N) = k0 + kw*U + kf*U*N + ke*E*N (see the script)",
        "gpus": {},
    }
    for gpu in ("a100", "h100"):
        coeffs, report = fit_compute(data, gpu)
        print("\n".join(report))
        table["gpus"][gpu] = {"layer": coeffs, "allreduce_topology": TOPOLOGY[gpu],
                              "allreduce": fit_allreduce(data, TOPOLOGY[gpu])}
    table["allreduce_a100_pairwise_nvlink"] = fit_allreduce(data, "a100_pairwise_nvlink")
    for gpu, t in table["gpus"].items():
        for w, c in t["allreduce"].items():
            print(f"{gpu} all-reduce {w} GPUs: {c['a_ms'] * 1e3:.1f} us + {1 / c['b_ms_per_byte'] / 1e6:.0f}"
                  f" GB/s-equivalent, median |err| {c['median_rel_err']:.1%}")
    Path(args.out).write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
