"""Served-engine calibration: the per-token / per-step split is exact, the scale fit recovers known
scales from simulated "measurements", stays sane on degenerate or absurd data, and round-trips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scheduler.calibration import (SCALE_BOUNDS, CalibrationSet, ServedCalibration,
                                   fit_served_scales, scale_latency, split_totals,
                                   token_shapes)
from scheduler.latency import LatencyModel
from scheduler.simulator import EngineLimits, simulate
from scheduler.types import SimRequest

FIT = LatencyModel(5e-3, 2e-5, 1e-9, 1.6e-7, 9e-5)
LIMITS = EngineLimits(32, 1024, 1024, 2000)
SHAPES = {  # prefill-heavy, decode-heavy, mixed (admission waves with max_num_seqs 32)
    "prefill": [(128 + (i * 97) % 385, 4) for i in range(32)],
    "decode": [(32, 128)] * 32,
    "mixed": [(16 + (i * 61) % 497, 8 + (i * 37) % 121) for i in range(64)],
}


def total(model: LatencyModel, reqs) -> float:
    return simulate([SimRequest(i, p, o) for i, (p, o) in enumerate(reqs)], LIMITS, model).total_time_s


def measured_sets(true_model: LatencyModel, noise: float = 0.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [CalibrationSet(n, tuple(r), total(true_model, r) * (1 + noise * rng.standard_normal()))
            for n, r in SHAPES.items()]


def test_split_totals_add_up_to_the_simulated_total():
    for reqs in SHAPES.values():
        p, d = split_totals(FIT, LIMITS, reqs)
        assert p > 0 and d > 0
        assert p + d == pytest.approx(total(FIT, reqs), rel=1e-9)
        # and scale linearly: the schedule does not depend on the latency model
        assert 1.7 * p + 0.6 * d == pytest.approx(total(scale_latency(FIT, 1.7, 0.6), reqs), rel=1e-9)


@pytest.mark.parametrize("tok,step", [(1.0, 1.0), (2.5, 1.2), (0.8, 3.0), (4.0, 0.5)])
def test_fit_recovers_known_scales(tok: float, step: float):
    cal = fit_served_scales(FIT, LIMITS, measured_sets(scale_latency(FIT, tok, step)))
    assert cal.token_scale == pytest.approx(tok, rel=1e-3)
    assert cal.step_scale == pytest.approx(step, rel=1e-3)
    for s in cal.sets:
        assert abs(s.err_after) < 1e-3
        assert s.sim_before_s == pytest.approx(total(FIT, SHAPES[s.name]))
    if (tok, step) != (1.0, 1.0):
        assert max(abs(s.err_before) for s in cal.sets) > 0.1


def test_fit_with_noise_is_close_and_improves_every_set():
    cal = fit_served_scales(FIT, LIMITS, measured_sets(scale_latency(FIT, 3.0, 1.5), 0.03, seed=4))
    assert cal.token_scale == pytest.approx(3.0, rel=0.25)
    assert cal.step_scale == pytest.approx(1.5, rel=0.25)
    assert all(abs(s.err_after) < 0.1 < abs(s.err_before) for s in cal.sets)


def test_fit_corrects_the_model_it_returns():
    true = scale_latency(FIT, 2.0, 1.3)
    cal = fit_served_scales(FIT, LIMITS, measured_sets(true))
    held_out = [(300, 20)] * 20 + [(40, 90)] * 30  # a shape not among the calibration sets
    assert total(cal.apply(FIT), held_out) == pytest.approx(total(true, held_out), rel=1e-3)


def test_degenerate_and_absurd_measurements():
    # a fit without per-token terms: the sets cannot see a token scale; it stays at 1
    no_tok = LatencyModel(5e-3, 0.0, 0.0, 1.6e-7, 9e-5)
    cal = fit_served_scales(no_tok, LIMITS, measured_sets(scale_latency(no_tok, 1.0, 2.0)))
    assert cal.token_scale == pytest.approx(1.0) and cal.step_scale == pytest.approx(2.0, rel=1e-3)
    # a stalled machine (1000x slower) cannot push the scales past the bounds
    sets = [CalibrationSet(s.name, s.requests, s.measured_s * 1000) for s in measured_sets(FIT)]
    cal = fit_served_scales(FIT, LIMITS, sets)
    assert cal.token_scale <= SCALE_BOUNDS[1] and cal.step_scale <= SCALE_BOUNDS[1]
    with pytest.raises(ValueError):
        fit_served_scales(FIT, LIMITS, [])
    with pytest.raises(ValueError):
        fit_served_scales(FIT, LIMITS, [CalibrationSet("x", ((4, 4),), 0.0)])


def test_calibration_round_trips_through_json():
    cal = fit_served_scales(FIT, LIMITS, measured_sets(scale_latency(FIT, 2.0, 1.3), 0.02))
    back = ServedCalibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back == cal
    d = cal.to_dict()
    assert {s["name"] for s in d["sets"]} == set(SHAPES)
    assert all(s["err_after"] == pytest.approx(s["sim_after_s"] / s["measured_s"] - 1) for s in d["sets"])


def test_cold_shape_cost_is_fitted_per_new_token_count():
    # first runs pay 0.09 s per token count the engine has not run before (sets in order)
    warm = measured_sets(FIT)
    seen: set[int] = set()
    sets = []
    for s in warm:
        shapes = token_shapes(LIMITS, s.requests, FIT)
        sets.append(CalibrationSet(s.name, s.requests, s.measured_s,
                                   s.measured_s + 0.09 * len(shapes - seen)))
        seen |= shapes
    cal = fit_served_scales(FIT, LIMITS, sets)
    assert cal.new_shape_s == pytest.approx(0.09, rel=1e-6)
    assert cal.first_request_s == pytest.approx(0.0, abs=1e-9)
    # the first set also pays a fresh engine's first-request cost: it is separated
    sets[0] = CalibrationSet(sets[0].name, sets[0].requests, sets[0].measured_s,
                             sets[0].first_s + 4.0)
    cal = fit_served_scales(FIT, LIMITS, sets)
    assert cal.new_shape_s == pytest.approx(0.09, rel=1e-6)
    assert cal.first_request_s == pytest.approx(4.0, rel=1e-6)
    assert cal.token_scale == pytest.approx(1.0, rel=1e-3)  # scales come from the warm runs
    assert [s.new_shapes for s in cal.sets][0] == len(token_shapes(LIMITS, SHAPES["prefill"], FIT))
    held_out = [(300, 20)] * 20 + [(40, 90)] * 30
    n = len(token_shapes(LIMITS, held_out, FIT))
    assert 3 <= n and cal.cold_extra(LIMITS, held_out, FIT) == pytest.approx(4.0 + 0.09 * n)
    assert ServedCalibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal
    # first runs faster than warm ones (noise) never give a negative cost; no first runs: 0
    fast = [CalibrationSet(s.name, s.requests, s.measured_s, s.measured_s * 0.9) for s in warm]
    assert fit_served_scales(FIT, LIMITS, fast).new_shape_s == 0.0
    assert fit_served_scales(FIT, LIMITS, warm).new_shape_s == 0.0
