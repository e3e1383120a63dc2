"""GPU latency models composed from the committed coefficients, and the architecture table."""

from __future__ import annotations

import pytest

from scheduler.archs import PAPER_MODELS, paper_model_spec
from scheduler.data import load_json
from scheduler.gpu_profiles import gpu_latency_model, gpu_load_time_s
from scheduler.latency import prefill_attn_work


def test_architectures_give_public_parameter_counts():
    expected = {"llama-2-7b": 6.7, "llama-2-13b": 13.0, "llama-2-70b": 69.0, "mixtral-8x7b": 46.7,
                "codellama-34b": 33.7, "mistral-7b": 7.2, "dolly-v2-12b": 11.8, "mpt-7b-chat": 6.9,
                "chatglm3-6b": 6.2, "stablelm-tuned-alpha-7b": 7.9}
    for name, billions in expected.items():
        assert paper_model_spec(name).param_count / 1e9 == pytest.approx(billions, rel=0.03), name
    assert len(PAPER_MODELS) >= 16
    spec = paper_model_spec("Llama-2-70b-chat", max_num_seqs=128)
    assert spec.name == "llama-2-70b" and spec.max_num_seqs == 128 and spec.max_model_len == 4096
    with pytest.raises(KeyError):
        paper_model_spec("gpt-5")


def test_coefficients_name_their_source():
    table = load_json("gpu_coeffs.json")
    assert "vidur" in table["source"] and set(table["gpus"]) == {"a100", "h100"}


@pytest.mark.parametrize("gpu", ["a100", "h100"])
def test_decode_step_is_near_the_memory_floor(gpu):
    spec = paper_model_spec("llama-2-13b")
    lat = gpu_latency_model(spec, 1, gpu)
    floor = spec.weight_bytes / {"a100": 2.039e12, "h100": 3.35e12}[gpu]
    step = lat.iteration_time(32, 0.0, 32 * 1000, 32)
    # a batch-32 decode step reads all weights once: ~1-2x the bandwidth floor, not 10x
    assert floor < step < 2.5 * floor + 5e-3


def test_prefill_throughput_is_plausible():
    spec = paper_model_spec("llama-2-7b")
    lat = gpu_latency_model(spec, 1, "a100")
    t = lat.iteration_time(4096, prefill_attn_work(4096, 0), 0, 1)
    achieved = spec.flops_per_token * 4096 / t
    assert 0.3 * 312e12 < achieved < 0.9 * 312e12


def test_h100_faster_than_a100_and_tp_splits_work():
    spec = paper_model_spec("llama-2-70b")
    a2, h2 = gpu_latency_model(spec, 2, "a100"), gpu_latency_model(spec, 2, "h100")
    a4 = gpu_latency_model(spec, 4, "a100")
    work = (2048, prefill_attn_work(1024, 0) * 2, 0, 2)
    assert h2.iteration_time(*work) < a2.iteration_time(*work)
    assert a4.iteration_time(*work) < a2.iteration_time(*work)
    assert a2.allreduce_s_per_token > 0 and gpu_latency_model(spec, 8, "h100").c1 > 0
    with pytest.raises(ValueError):
        gpu_latency_model(spec, 3, "a100")
    with pytest.raises(ValueError):
        gpu_latency_model(spec, 1, "tpu")


def test_moe_reads_all_experts_but_computes_two():
    mix, mis = paper_model_spec("mixtral-8x7b"), paper_model_spec("mistral-7b")
    lm, ls = gpu_latency_model(mix, 2, "a100"), gpu_latency_model(mis, 2, "a100")
    assert lm.c0 > 3 * ls.c0  # 8 experts' weights read per step
    assert lm.c1 < 3 * ls.c1  # but only 2 experts' GEMMs per token


def test_load_time_estimate_against_paper_measurements():
    # PAPER §2.4: vicuna-13b tp=1 29.98 s, chatglm3-6b tp=1 11.53 s
    assert gpu_load_time_s(paper_model_spec("vicuna-13b-v1.5"), 1) == pytest.approx(30.0, rel=0.2)
    # 12.5 GB / 2 GB/s + 15 s = 21 s: the fixed cost dominates small models (within 2x)
    assert 11.53 < gpu_load_time_s(paper_model_spec("chatglm3-6b"), 1) < 2 * 11.53
    assert gpu_latency_model(paper_model_spec("llama-2-7b"), 1).load_time_s > 15.0
