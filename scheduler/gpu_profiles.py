"""GPU latency models for any architecture, composed from committed per-operator fits.

`scheduler/data/gpu_coeffs.json` (made by `bench/derive_gpu_profiles.py` from Vidur's real A100/H100
operator timings) holds, per GPU and TP degree, one scaling of a transformer layer's token-level
operators: `layer_ms(N) = k0 + kw·U + kf·U·N + ke·E·N` (U = linear weights per rank per layer,
E = h + I/TP), and all-reduce `ms = a + b·bytes`. `gpu_latency_model` maps them onto the
simulator's `LatencyModel`:

- c0: L·(k0 + kw·U) (weights read every step) + the LM head's weights read + a fixed step cost;
- c1: L·(kf·U + ke·E) per scheduled token;
- c4: the LM head's GEMM for each request's sampled token (vLLM computes logits only there);
- c2: prefill attention as FLOP-bound: 4·h/TP FLOPs per query×key pair per layer at
  `ATTN_EFFICIENCY` of the dense fp16 peak (A100 312, H100 989 TFLOPS);
- c3: decode attention as memory-bound: each context token's K and V per rank read at
  `BW_EFFICIENCY` of the HBM bandwidth (A100 2.039, H100 3.35 TB/s);
- all-reduce: 2 per layer of N·h·dtype bytes (TP > 1).
MoE: all experts' weights are read, `experts_per_token` experts' GEMMs run per token.
"""

from __future__ import annotations

from scheduler.data import load_json
from scheduler.latency import LatencyModel
from scheduler.types import ModelSpec

PEAK_FLOPS = {"a100": 312e12, "h100": 989e12}  # dense fp16/bf16 tensor-core peak
HBM_BW = {"a100": 2.039e12, "h100": 3.35e12}  # bytes/s
ATTN_EFFICIENCY = 0.5  # FlashAttention-2 reaches ~50-70% of peak on long prefills
BW_EFFICIENCY = 0.8  # paged decode attention reaches ~80% of HBM bandwidth
STEP_OVERHEAD_S = 1.5e-3  # scheduler, input preparation, sampling per iteration (V1, CUDA graphs)
DISK_BW = 2e9  # bytes/s: loading safetensors from local NVMe through page cache
LOAD_FIXED_S = 15.0  # process start, CUDA/NCCL init, memory profiling, CUDA-graph capture


def _gpu(gpu: str) -> str:
    g = gpu.lower()
    if g in ("cuda", "gpu"):
        g = "a100"
    if g not in PEAK_FLOPS:
        raise ValueError(f"no GPU coefficients for {gpu!r} (known: {', '.join(PEAK_FLOPS)})")
    return g


def gpu_latency_model(spec: ModelSpec, tp: int, gpu: str = "a100") -> LatencyModel:
    """Per-iteration latency of `spec` on `tp` GPUs of kind `gpu` ("a100" | "h100"), load time included."""
    g = _gpu(gpu)
    table = load_json("gpu_coeffs.json")["gpus"][g]
    layer = table["layer"].get(str(tp))
    if layer is None or not spec.valid_tp(tp):
        raise ValueError(f"{spec.name}: no {g} coefficients for tp={tp} "
                         f"(fitted: {', '.join(table['layer'])})")
    k0, kw = layer["k0_ms"] * 1e-3, layer["kw_ms_per_weight"] * 1e-3
    kf, ke = layer["kf_ms_per_weight_token"] * 1e-3, layer["ke_ms_per_elem_token"] * 1e-3
    h, kv, inter = spec.hidden_size, spec.kv_dim, spec.intermediate_size
    attn_w = h * (h + 2 * kv) + h * h
    u_read = (attn_w + 3 * h * inter * spec.num_experts) / tp
    u_flop = (attn_w + 3 * h * inter * spec.experts_per_token) / tp
    elems = h + inter / tp
    lm_head = spec.vocab_size * h / tp
    bw, peak = HBM_BW[g], PEAK_FLOPS[g]
    c0 = spec.num_layers * (k0 + kw * u_read) + lm_head * spec.dtype_bytes / bw + STEP_OVERHEAD_S
    c1 = spec.num_layers * (kf * u_flop + ke * elems)
    c2 = spec.num_layers * 4.0 * h / tp / (peak * ATTN_EFFICIENCY)
    c3 = spec.kv_bytes_per_token(tp) / (bw * BW_EFFICIENCY)
    c4 = kf * lm_head
    ar_tok = ar_fixed = 0.0
    if tp > 1:
        ar = table["allreduce"][str(tp)]
        ar_tok = 2 * spec.num_layers * ar["b_ms_per_byte"] * 1e-3 * h * spec.dtype_bytes
        ar_fixed = 2 * spec.num_layers * ar["a_ms"] * 1e-3
    return LatencyModel(c0, c1, c2, c3, c4, allreduce_s_per_token=ar_tok,
                        allreduce_fixed_s=ar_fixed, load_time_s=gpu_load_time_s(spec, tp, g))


def gpu_load_time_s(spec: ModelSpec, tp: int, gpu: str = "a100") -> float:
    """Engine start estimate: all weight bytes read from disk at DISK_BW (ranks share the disk) plus
    a fixed start cost. E.g. 13B fp16: 26 GB / 2 GB/s + 15 s = 28 s (PAPER §2.4 measured vicuna-13b
    tp=1 at 30.0 s); overridden by a measured profile's load_time_s where one exists."""
    _gpu(gpu)
    return spec.weight_bytes / DISK_BW + LOAD_FIXED_S
