"""Latency model: evaluation, NNLS fit recovering known coefficients, JSON round trips, roofline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scheduler.latency import (DEVICE_ROOFLINE, IterationSample, LatencyModel, Profile, analytic_latency_model,
                               fit_latency_model, prefill_attn_work, relative_errors)
from scheduler.types import ModelSpec

TRUE = LatencyModel(4e-3, 3e-5, 2e-9, 5e-7, 2e-4)


def synthetic(model: LatencyModel, n: int, noise: float, seed: int = 0) -> list[IterationSample]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        kind = rng.integers(3)
        batch = int(rng.integers(1, 64))
        chunk = int(rng.integers(1, 2048)) if kind != 1 else 0
        ctx = int(rng.integers(0, 2048))
        work = prefill_attn_work(chunk, ctx) if chunk else 0.0
        decodes = batch if kind != 0 else 0
        dctx = int(rng.integers(1, 1500) * decodes)
        tokens = chunk + decodes
        bsz = decodes + (1 if chunk else 0)
        t = model.iteration_time(tokens, work, dctx, bsz) * (1 + noise * rng.standard_normal())
        out.append(IterationSample(tokens, work, dctx, bsz, t))
    return out


def test_prefill_attn_work():
    assert prefill_attn_work(4, 0) == 8.0  # 4 queries attending 1..4 keys ≈ 4·2
    assert prefill_attn_work(10, 100) == 10 * 105


def test_fit_recovers_known_coefficients():
    fitted = fit_latency_model(synthetic(TRUE, 400, 0.0), load_time_s=12.5)
    for name in ("c0", "c1", "c2", "c3", "c4"):
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), rel=1e-4), name
    assert fitted.load_time_s == 12.5


def test_fit_with_noise_is_close_and_non_negative():
    samples = synthetic(TRUE, 600, 0.03, seed=1)
    fitted = fit_latency_model(samples)
    assert all(getattr(fitted, f) >= 0 for f in ("c0", "c1", "c2", "c3", "c4"))
    assert np.median(np.abs(relative_errors(fitted, samples))) < 0.03
    assert fitted.c1 == pytest.approx(TRUE.c1, rel=0.1)
    assert fitted.c3 == pytest.approx(TRUE.c3, rel=0.1)


def test_fit_rejects_too_few_or_bad_samples():
    with pytest.raises(ValueError):
        fit_latency_model(synthetic(TRUE, 3, 0.0))
    bad = [IterationSample(1, 0.0, 0, 1, 0.0)] * 6
    with pytest.raises(ValueError):
        fit_latency_model(bad)


def test_round_trips_through_json():
    lat = LatencyModel(1e-3, 2e-5, 3e-9, 4e-7, 5e-5, allreduce_s_per_token=1e-6,
                       allreduce_fixed_s=2e-4, load_time_s=25.0)
    assert LatencyModel.from_dict(json.loads(json.dumps(lat.to_dict()))) == lat
    prof = Profile("tiny", 2, "cpu", lat, {"samples": 120, "median_rel_err": 0.04})
    back = Profile.from_dict(json.loads(json.dumps(prof.to_dict())))
    assert back == prof and back.key == ("tiny", 2, "cpu")
    assert lat.with_load_time(3.0).load_time_s == 3.0


def test_iteration_time_includes_allreduce():
    lat = LatencyModel(1.0, 0.5, 0.0, 0.0, 0.0, allreduce_s_per_token=0.25, allreduce_fixed_s=2.0)
    assert lat.iteration_time(4, 0.0, 0, 1) == pytest.approx(1.0 + 2.0 + 4 * 0.75)


def test_analytic_model_scales_with_size_and_tp():
    small = ModelSpec("s", 2, 128, 2, 1, 512, 1000, dtype_bytes=4)
    big = ModelSpec("b", 8, 512, 8, 2, 2048, 1000, dtype_bytes=4)
    s1, b1, b2 = (analytic_latency_model(small, 1), analytic_latency_model(big, 1),
                  analytic_latency_model(big, 2))
    assert b1.iteration_time(256, 0, 0, 1) > s1.iteration_time(256, 0, 0, 1)
    assert b2.c1 == pytest.approx(b1.c1 / 2) and b2.allreduce_s_per_token > 0
    assert b1.c3 == pytest.approx(big.kv_bytes_per_token(1) / DEVICE_ROOFLINE["cpu"][1])
    gpu = analytic_latency_model(big, 1, "h100")
    assert gpu.iteration_time(256, 0, 0, 1) < b1.iteration_time(256, 0, 0, 1)


def test_fit_is_unbiased_and_robust_to_contention_spikes():
    # A shared CPU: every step a little noisy, one in five slowed 1.5-4x by another process. The
    # fit must follow the undisturbed steps (median relative error ~0 on the clean truth), where a
    # 1/measured-weighted least squares fit comes out far off.
    rng = np.random.default_rng(3)
    clean = synthetic(TRUE, 500, 0.02, seed=2)
    spiky = [IterationSample(s.num_tokens, s.prefill_attn_work, s.decode_ctx_sum, s.batch_size,
                             s.seconds * (rng.uniform(1.5, 4.0) if rng.random() < 0.2 else 1.0))
             for s in clean]
    fitted = fit_latency_model(spiky)
    err = relative_errors(fitted, clean)
    assert abs(np.median(err)) < 0.03
    assert np.quantile(np.abs(err), 0.9) < 0.08
