"""Public architecture facts of the paper's models (from each model's HF `config.json`), so plans can
be made for GPUs this machine does not have. `max_model_len` is the model's trained context."""

from __future__ import annotations

from typing import Any

from scheduler.types import ModelSpec

_LLAMA13 = dict(layers=40, hidden=5120, heads=40, kv_heads=40, intermediate=13824, vocab=32000)
_PYTHIA12 = dict(layers=36, hidden=5120, heads=40, kv_heads=40, intermediate=20480, vocab=50688,
                 gated=False)

# layers, hidden, heads, kv_heads, intermediate, vocab, experts (+ experts_per_token), gated MLP
PAPER_MODELS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(layers=32, hidden=4096, heads=32, kv_heads=32, intermediate=11008,
                       vocab=32000, max_model_len=4096),
    "llama-2-13b": dict(_LLAMA13, max_model_len=4096),
    "llama-2-70b": dict(layers=80, hidden=8192, heads=64, kv_heads=8, intermediate=28672,
                        vocab=32000, max_model_len=4096),
    "vicuna-13b-v1.5": dict(_LLAMA13, max_model_len=4096),
    "mixtral-8x7b": dict(layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336,
                         vocab=32000, experts=8, experts_per_token=2, max_model_len=32768),
    "codellama-34b": dict(layers=48, hidden=8192, heads=64, kv_heads=8, intermediate=22016,
                          vocab=32000, max_model_len=16384),
    "mistral-7b": dict(layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336,
                       vocab=32000, max_model_len=32768),
    "wizardlm-13b": dict(_LLAMA13, vocab=32001, max_model_len=4096),
    # LLM-Blender's candidate set
    "oasst-sft-4-pythia-12b": dict(_PYTHIA12, vocab=50288, max_model_len=2048),
    "alpaca-13b": dict(_LLAMA13, max_model_len=2048),
    "baize-v2-13b": dict(_LLAMA13, max_model_len=2048),
    "koala-13b": dict(_LLAMA13, max_model_len=2048),
    "dolly-v2-12b": dict(_PYTHIA12, vocab=50280, max_model_len=2048),
    "mpt-7b-chat": dict(layers=32, hidden=4096, heads=32, kv_heads=32, intermediate=16384,
                        vocab=50432, gated=False, max_model_len=2048),
    "chatglm3-6b": dict(layers=28, hidden=4096, heads=32, kv_heads=2, intermediate=13696,
                        vocab=65024, max_model_len=8192),
    "stablelm-tuned-alpha-7b": dict(layers=16, hidden=6144, heads=48, kv_heads=48,
                                    intermediate=24576, vocab=50432, gated=False,
                                    max_model_len=4096),
}
ALIASES = {"llama-2-70b-chat": "llama-2-70b", "llama-2-13b-chat": "llama-2-13b",
           "llama-2-7b-chat": "llama-2-7b", "mixtral-8x7b-instruct": "mixtral-8x7b",
           "codellama-34b-instruct": "codellama-34b", "mistral-7b-instruct": "mistral-7b",
           "vicuna-13b": "vicuna-13b-v1.5"}


def paper_model_spec(name: str, **limits: Any) -> ModelSpec:
    """ModelSpec of a paper model (case-insensitive, aliases accepted); `limits` override engine
    fields (max_num_seqs, max_num_batched_tokens, max_model_len, dtype_bytes, name).

    ModelSpec counts a gated MLP (3·h·I weights); a plain 2-matrix MLP (Pythia, MPT, StableLM) is
    expressed with an equivalent intermediate size 2I/3 so weights and FLOPs come out right."""
    key = name.lower()
    key = ALIASES.get(key, key)
    if key not in PAPER_MODELS:
        raise KeyError(f"unknown paper model {name!r} (known: {', '.join(sorted(PAPER_MODELS))})")
    a = PAPER_MODELS[key]
    inter = a["intermediate"] if a.get("gated", True) else a["intermediate"] * 2 // 3
    fields: dict[str, Any] = dict(
        name=key, num_layers=a["layers"], hidden_size=a["hidden"], num_heads=a["heads"],
        num_kv_heads=a["kv_heads"], intermediate_size=inter, vocab_size=a["vocab"], dtype_bytes=2,
        max_model_len=a["max_model_len"], num_experts=a.get("experts", 1),
        experts_per_token=a.get("experts_per_token", 1))
    fields.update(limits)
    return ModelSpec(**fields)
