"""Profiler: sweep shapes stay within engine limits, profiles round-trip through storage, and the
per-step features read from vLLM's scheduler add up to exactly the work submitted."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.config import Config
from tools.profiler import Case, default_sweep, measure_iterations
from runtime.persist import load_profile, load_profiles, profile_path, save_profile
from scheduler.latency import LatencyModel, Profile


def test_default_sweep_respects_limits():
    for quick in (False, True):
        cases = default_sweep(1024, 32, 1024, quick=quick)
        sizes = {len(c.requests) for c in cases}
        assert 1 in sizes and 32 in sizes
        for c in cases:
            assert len(c.requests) <= 32
            assert all(p + o <= 1024 and p > 0 and o > 0 for _, p, o in c.requests)
        assert any(p > 1024 // 2 for c in cases for _, p, _ in c.requests)  # long prefills


def test_profile_round_trip(tmp_path: Path):
    lat = LatencyModel(1e-3, 2e-5, 3e-9, 4e-7, 5e-5, load_time_s=21.5)
    prof = Profile("org/model a", 2, "cpu", lat, meta={"samples": 7})
    path = save_profile(tmp_path, prof)
    assert path == profile_path(tmp_path, "org/model a", 2, "cpu") and path.exists()
    assert load_profile(tmp_path, "org/model a", 2, "cpu") == prof
    assert load_profile(tmp_path, "org/model a", 1, "cpu") is None
    assert load_profiles(tmp_path) == {prof.key: prof}
    path.write_text("{broken")
    assert load_profile(tmp_path, "org/model a", 2, "cpu") is None and load_profiles(tmp_path) == {}


@pytest.mark.engine
def test_measured_steps_account_for_all_work(test_config: Config, tmp_path: Path):
    m = test_config.model("tiny-a")
    cases = [Case("a", ((0, 300, 5), (0, 40, 9))), Case("b", ((0, 16, 6),) * 3 + ((2, 700, 3),))]
    samples = measure_iterations(m, m.resolved_path(test_config.base_dir), (0,), 1, 1 << 27, cases,
                                 tmp_path, progress=False, repeats=2)
    # case "a" is also the warm-up (not recorded); each recorded request costs prompt + output - 1
    # forward tokens (the last sampled token is never fed back)
    expected = sum(p + o - 1 for c in cases for _, p, o in c.requests)
    assert sum(s.num_tokens for s in samples) == expected
    assert all(s.seconds > 0 and 1 <= s.batch_size <= 4 for s in samples)
    assert any(s.prefill_attn_work > 0 and s.decode_ctx_sum > 0 for s in samples)  # mixed steps
    # prefill work of the 700-token prompt, in however many chunks it ran: 700²/2
    assert sum(s.prefill_attn_work for s in samples) == pytest.approx(
        sum(p * p / 2 for c in cases for _, p, _ in c.requests))


def test_calibration_sets_are_distinct_shapes_within_limits():
    from tools.profiler import calibration_sets

    for mml, seqs, budget in ((1024, 32, 1024), (256, 8, 256), (64, 4, 64)):
        sets = dict(calibration_sets(seqs, mml, budget))
        assert set(sets) == {"prefill", "decode", "mixed"}
        for reqs in sets.values():
            assert all(p > 0 and o > 0 and p + o <= mml for p, o in reqs)
        assert len(sets["prefill"]) == len(sets["decode"]) == seqs
        assert len(sets["mixed"]) == 2 * seqs  # more than one batch: admission waves
        ratio = {n: sum(p for p, _ in r) / sum(o for _, o in r) for n, r in sets.items()}
        assert ratio["prefill"] > ratio["mixed"] > ratio["decode"]


def test_profile_meta_with_calibration_round_trips(tmp_path: Path):
    from scheduler.calibration import CalibrationSet, ServedCalibration, fit_served_scales
    from scheduler.simulator import EngineLimits

    fit = LatencyModel(5e-3, 2e-5, 1e-9, 1.6e-7, 9e-5)
    sets = [CalibrationSet("prefill", ((300, 4),) * 8, 2.0),
            CalibrationSet("decode", ((32, 64),) * 8, 1.0)]
    cal = fit_served_scales(fit, EngineLimits(8, 512, 1024, 500), sets)
    prof = Profile("m", 2, "cpu", cal.apply(fit).with_load_time(30.0),
                   meta={"in_process_latency": fit.to_dict(), "served_calibration": cal.to_dict()})
    save_profile(tmp_path, prof)
    back = load_profile(tmp_path, "m", 2, "cpu")
    assert back == prof
    assert ServedCalibration.from_dict(back.meta["served_calibration"]) == cal
    assert cal.apply(LatencyModel.from_dict(back.meta["in_process_latency"])).c1 == back.latency.c1
