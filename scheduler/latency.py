"""Per-iteration latency of one engine replica, and how it is fitted.

One forward pass ("iteration") of a vLLM engine costs, for a (model, TP degree, device kind):

    T = c0 + c1·tokens + c2·Σ prefill attention work + c3·Σ decode context + c4·batch
        + allreduce_s_per_token·tokens + allreduce_fixed_s

- `tokens`: tokens scheduled in the iteration (prefill chunks + one per decode); the GEMMs.
- prefill attention work of one chunk = `chunk · (ctx_before + chunk/2)`: the query×key pairs of a
  causal chunk appended after `ctx_before` cached tokens (quadratic in the chunk).
- decode context: Σ over decoding requests of the tokens each attends to (memory-bound KV reads).
- batch: requests in the iteration (sampling, per-sequence bookkeeping).

The coefficients are fitted with non-negative least squares from measured iterations
(`fit_latency_model`, fed by the runtime's profiler) or composed from GPU operator timings
(`scheduler.gpu_profiles`); `analytic_latency_model` is the roofline fallback when nothing was measured.
Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy.optimize import nnls

from scheduler.types import ModelSpec


def prefill_attn_work(chunk: int, ctx_before: int) -> float:
    """Causal attention pairs of a prefill chunk of `chunk` tokens after `ctx_before` cached tokens."""
    return chunk * (ctx_before + chunk / 2.0)


@dataclass(frozen=True)
class IterationSample:
    """One measured iteration: its features and its wall time in seconds."""

    num_tokens: int
    prefill_attn_work: float
    decode_ctx_sum: int
    batch_size: int
    seconds: float


@dataclass(frozen=True)
class LatencyModel:
    """Linear per-iteration latency model (seconds); see the module docstring for the features.
    `load_time_s` is the engine start time (weights + warm-up), used by the planner, not per iteration."""

    c0: float
    c1: float
    c2: float
    c3: float
    c4: float
    allreduce_s_per_token: float = 0.0
    allreduce_fixed_s: float = 0.0
    load_time_s: float = 0.0

    def iteration_time(self, num_tokens: int, prefill_attn_work: float, decode_ctx_sum: float,
                       batch_size: int) -> float:
        return (self.c0 + self.allreduce_fixed_s
                + (self.c1 + self.allreduce_s_per_token) * num_tokens
                + self.c2 * prefill_attn_work + self.c3 * decode_ctx_sum + self.c4 * batch_size)

    def with_load_time(self, load_time_s: float) -> "LatencyModel":
        return LatencyModel(**{**asdict(self), "load_time_s": float(load_time_s)})

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatencyModel":
        return cls(**{k: float(d[k]) for k in ("c0", "c1", "c2", "c3", "c4")},
                   allreduce_s_per_token=float(d.get("allreduce_s_per_token", 0.0)),
                   allreduce_fixed_s=float(d.get("allreduce_fixed_s", 0.0)),
                   load_time_s=float(d.get("load_time_s", 0.0)))


def _features(samples: Sequence[IterationSample]) -> np.ndarray:
    return np.array([[1.0, s.num_tokens, s.prefill_attn_work, s.decode_ctx_sum, s.batch_size]
                     for s in samples], dtype=float)


HUBER_K = 1.5  # residuals beyond 1.5 robust standard deviations get down-weighted (Huber)
FIT_ROUNDS = 12  # reweighting rounds; the weights settle in a handful on measured profiles


def _nnls_weighted(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """argmin_{c ≥ 0} Σ (w·(x·c − y))², with features scaled to unit norm for conditioning."""
    xw, yw = x * w[:, None], y * w
    scale = np.linalg.norm(xw, axis=0)
    scale[scale == 0] = 1.0  # a feature never exercised gets coefficient 0
    coef, _ = nnls(xw / scale, yw)
    return coef / scale


def fit_latency_model(samples: Sequence[IterationSample], load_time_s: float = 0.0) -> LatencyModel:
    """Robust non-negative least squares fit of c0..c4 to measured iterations, in relative terms.

    Relative: each row is weighted by 1/predicted time so short decode steps and long prefills count
    alike. Weighting by 1/*measured* time instead (one plain NNLS) biases every prediction low: a
    step slowed down by another process gets a small weight, one that ran fast a large one; on a
    shared CPU that bias was 30-50 % on decode steps. Robust: iteratively reweighted with Huber
    weights on the relative residual (scale = MAD), so the one-sided spikes of a preempted step do
    not drag the fit up, while a quiet profile (residuals within a few %) is an ordinary fit.
    Exact data is recovered exactly. All-reduce is not separated here: on a measured profile it is
    part of c0/c1.
    """
    if len(samples) < 5:
        raise ValueError(f"need at least 5 samples to fit 5 coefficients, got {len(samples)}")
    x = _features(samples)
    y = np.array([s.seconds for s in samples], dtype=float)
    if np.any(y <= 0):
        raise ValueError("sample times must be positive")
    coef = _nnls_weighted(x, y, 1.0 / y)
    floor = 1e-3 * float(np.min(y))  # keeps 1/pred finite when a row is predicted as 0
    for _ in range(FIT_ROUNDS):
        pred = np.maximum(x @ coef, floor)
        r = (y - pred) / pred
        spread = 1.4826 * float(np.median(np.abs(r - np.median(r))))
        a = np.abs(r)
        huber = np.where(a <= HUBER_K * spread, 1.0,
                         HUBER_K * spread / np.maximum(a, 1e-300)) if spread > 1e-12 else np.ones_like(r)
        new = _nnls_weighted(x, y, np.sqrt(huber) / pred)
        done = np.allclose(new, coef, rtol=1e-6, atol=0.0)
        coef = new
        if done:
            break
    return LatencyModel(*(float(c) for c in coef), load_time_s=float(load_time_s))


def relative_errors(model: LatencyModel, samples: Sequence[IterationSample]) -> np.ndarray:
    """Signed relative error (predicted − measured) / measured of each sample."""
    pred = np.array([model.iteration_time(s.num_tokens, s.prefill_attn_work, s.decode_ctx_sum,
                                          s.batch_size) for s in samples])
    meas = np.array([s.seconds for s in samples])
    return (pred - meas) / meas


@dataclass(frozen=True)
class Profile:
    """A latency model for one (model, TP degree, device signature), with free-form provenance
    in `meta` (e.g. number of samples, fit error, engine version). JSON-able via to_dict."""

    model: str
    tp: int
    device: str
    latency: LatencyModel
    meta: dict[str, Any] = field(default_factory=dict)
    threads: int = 1  # CPU cores per TP rank (OpenMP threads); 1 = one core per rank

    @property
    def key(self) -> tuple:
        """(model, tp, device), with threads appended when > 1 (profiles from before threads
        existed, and their keys, are the threads = 1 ones)."""
        base = (self.model, self.tp, self.device)
        return base if self.threads == 1 else base + (self.threads,)

    def to_dict(self) -> dict[str, Any]:
        out = {"model": self.model, "tp": self.tp, "device": self.device,
               "latency": self.latency.to_dict(), "meta": dict(self.meta)}
        if self.threads != 1:
            out["threads"] = self.threads
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Profile":
        return cls(model=str(d["model"]), tp=int(d["tp"]), device=str(d["device"]),
                   latency=LatencyModel.from_dict(d["latency"]), meta=dict(d.get("meta", {})),
                   threads=int(d.get("threads", 1)))


# How a CPU rank runs on `threads` cores against one, where that shape was not measured
# (`samullm profile --threads N` measures it), as exponents of `threads` by which three kinds of
# cost are divided: (compute: the GEMMs c1 and prefill attention c2; memory: the decode KV reads c3
# and the weight-reading share of c0; fixed: the rest of c0 and the per-sequence c4). Fitted
# (`bench/derive_cpu_roofline.py`) to the 2-thread profiles of the demo models (tiny-a, small,
# medium; `samullm profile --quick` with the served calibration, 5 Dec 2026, this 2-core machine,
# beside the CPU roofline of that day below) against their 1-thread ones: compute 1.62x faster on
# two cores, memory reads no faster (0.99x), fixed costs 1.08x slower (the API server and
# engine-core processes then share those cores); the 2-thread profiles' grid steps are met within
# a median 0.88-1.10x. The exponents of 4 Dec (0.85, 0.65, -0.59), fitted before the engines'
# set-up of 5 Dec, priced them 0.81-1.17x. Before those, every compute term was assumed 2 ** 0.25
# = 1.19x faster (from `small` alone): medium's 2-thread engine priced 43 % too slow.
CPU_THREADS_EXPONENTS = (0.70, -0.02, -0.11)


def assumed_threads_latency(lat: LatencyModel, spec: ModelSpec, tp: int,
                            threads: int) -> LatencyModel:
    """`lat` (one core per rank) for ranks on `threads` cores, by `CPU_THREADS_EXPONENTS`; the
    weight-reading share of c0 is the roofline's for (spec, tp) (`weight_read_share`)."""
    if threads <= 1:
        return lat
    compute, memory, fixed = (float(threads) ** k for k in CPU_THREADS_EXPONENTS)
    share = weight_read_share(spec, tp)
    return LatencyModel(**{**asdict(lat), "c0": lat.c0 * (share / memory + (1.0 - share) / fixed),
                           "c1": lat.c1 / compute, "c2": lat.c2 / compute,
                           "c3": lat.c3 / memory, "c4": lat.c4 / fixed})


def weight_read_share(spec: ModelSpec, tp: int) -> float:
    """The share of the CPU roofline's per-step c0 that is reading the weight shard (the rest is
    fixed overhead)."""
    _, bw, fixed, _, _ = DEVICE_ROOFLINE["cpu"]
    read = spec.weight_bytes / tp / bw
    return read / (read + fixed)


# Roofline constants for `analytic_latency_model`, per device (one CPU core / one GPU):
# (sustained linear-layer FLOP/s, memory bandwidth B/s, fixed per-iteration overhead s,
#  per-sequence overhead s, all-reduce cost per layer and step at TP > 1 s).
# CPU: fitted (`bench/derive_cpu_roofline.py`) to the profiles of the demo models (tiny-a, small,
# medium at TP 1 and 2, one core per rank; `samullm profile --quick` with the served calibration)
# on this 2-core machine, 5 Dec 2026 (21:46-22:03), as engines have run since 5 Dec (one-core
# ranks forked from the spare, every process on its planned cores): 65 GFLOP/s, 13 GB/s, 4.0 ms
# per step, 111 us per sequence, 2.1 ms per layer's all-reduces at TP 2; the profiles' step times
# on a grid of decode and prefill steps are met within a median 0.95-1.07x. The constants fitted on
# 4 Dec, before that engine set-up (146 GFLOP/s, 9.3 GB/s, 2.0 ms, 40 us, 92 us), priced these
# profiles' steps 0.54-0.83x at TP 1 and 0.22-0.31x at TP 2: a fresh gateway's first batch came
# out 26 % longer than predicted (`bench.fresh`, 6 Dec 05:00). The earlier guesses (20 GFLOP/s,
# 4 ms per step) predicted 1.7-2.3x too slow.
# GPUs: dense fp16 peak × ~50% achieved, published HBM bandwidth.
CPU_FLOPS, CPU_BW, CPU_FIXED_S = 6.479e10, 1.305e10, 3.995e-3
CPU_PER_SEQ_S, CPU_ALLREDUCE_S = 1.115e-4, 2.080e-3
DEVICE_ROOFLINE: dict[str, tuple[float, float, float, float, float]] = {
    "cpu": (CPU_FLOPS, CPU_BW, CPU_FIXED_S, CPU_PER_SEQ_S, CPU_ALLREDUCE_S),
    "a100": (312e12 * 0.5, 2.039e12, 4e-3, 2e-5, 2e-5),
    "h100": (989e12 * 0.5, 3.35e12, 3e-3, 1.5e-5, 2e-5),
}
DEVICE_ROOFLINE["cuda"] = DEVICE_ROOFLINE["a100"]


def analytic_latency_model(spec: ModelSpec, tp: int, device: str = "cpu") -> LatencyModel:
    """Rough roofline model for a model nothing was measured for; measured profiles override it.

    c0: reading every weight shard once per iteration (the decode floor) + fixed overhead;
    c1: 2 FLOPs per active weight per token, split over TP ranks;
    c2: QKᵀ and AV cost 4·hidden FLOPs per query×key pair per layer;
    c3: reading one token's K and V per layer from memory;
    c4: per-sequence overhead (sampling, bookkeeping).
    TP adds per-layer all-reduces, modelled as moving hidden·dtype bytes twice per layer at memory speed.
    """
    flops, bw, fixed, per_seq, ar_layer = DEVICE_ROOFLINE.get(device, DEVICE_ROOFLINE["cpu"])
    c0 = spec.weight_bytes / tp / bw + fixed
    c1 = spec.flops_per_token / tp / flops
    c2 = 4.0 * spec.hidden_size * spec.num_layers / tp / flops
    c3 = spec.kv_bytes_per_token(tp) / bw
    ar_tok = 0.0
    ar_fixed = 0.0
    if tp > 1:
        ar_tok = 2 * spec.num_layers * spec.hidden_size * spec.dtype_bytes * 2 * (tp - 1) / tp / bw
        ar_fixed = 2 * spec.num_layers * ar_layer
    return LatencyModel(c0, c1, c2, c3, per_seq, allreduce_s_per_token=ar_tok,
                        allreduce_fixed_s=ar_fixed)
