"""Output-length distributions: caps, censoring, prior weighting, online learning, persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scheduler.lengths import LengthDistribution, LengthModel, prior_quantiles

CHAT = "/v1/chat/completions"


def test_shipped_prior_matches_the_conversation_trace():
    q = prior_quantiles("conversation")
    assert q.size == 200 and np.all(np.diff(q) >= 0)
    assert 195 < q.mean() < 225 and 120 <= np.median(q) <= 140  # trace: mean 211, median 129
    assert prior_quantiles("arxiv", "prefill").mean() > prior_quantiles("code").mean()


def test_default_model_samples_the_prior_and_respects_caps():
    rng = np.random.default_rng(0)
    s = LengthModel().sample("any", CHAT, np.full(20_000, 4096), rng)
    assert 195 < s.mean() < 225
    caps = rng.integers(1, 300, 5000)
    s = LengthModel().sample("any", CHAT, caps, rng)
    assert np.all(s <= caps) and np.all(s >= 1)
    assert np.any(s < caps)  # natural endings below the caps exist in the prior


def test_ecdf_of_natural_endings_without_prior():
    d = LengthDistribution()
    for v in (10, 20, 30, 40):
        d.observe(v, capped=False)
    s = d.sample(np.random.default_rng(1), np.full(4000, 1000))
    assert set(np.unique(s)) == {10, 20, 30, 40}
    assert abs((s == 10).mean() - 0.25) < 0.03
    s = d.sample(np.random.default_rng(1), np.full(4000, 25))
    assert set(np.unique(s)) == {10, 20, 25}


def test_only_capped_observations_sample_the_cap():
    d = LengthDistribution()
    for _ in range(30):
        d.observe(64, capped=True)
    rng = np.random.default_rng(2)
    assert np.all(d.sample(rng, np.full(100, 64)) == 64)
    # a larger cap than ever observed: the natural length is unknown beyond 64, so the cap is drawn
    assert np.all(d.sample(rng, np.full(100, 500)) == 500)
    assert np.all(d.sample(rng, np.full(100, 10)) == 10)


def test_censoring_does_not_invent_short_endings():
    # natural endings at 100, and as many requests cut at 50 (their natural length is > 50):
    # the naive ECDF would put half the mass at 50; Kaplan–Meier puts none below 100
    d = LengthDistribution()
    for _ in range(40):
        d.observe(100, capped=False)
        d.observe(50, capped=True)
    s = d.sample(np.random.default_rng(3), np.full(2000, 1000))
    assert np.all(s == 100)
    # censored after the natural endings: KM keeps their share as "longer than seen" -> cap
    d2 = LengthDistribution()
    for _ in range(40):
        d2.observe(20, capped=False)
        d2.observe(80, capped=True)
    s = d2.sample(np.random.default_rng(4), np.full(4000, 300))
    assert set(np.unique(s)) == {20, 300} and abs((s == 20).mean() - 0.5) < 0.04


def test_prior_weight_decays_with_observations():
    m = LengthModel()
    rng = np.random.default_rng(5)
    for _ in range(2000):  # a tiny model that always runs to max_tokens=32
        m.observe("tiny", CHAT, 32, capped=True)
    s = m.sample("tiny", CHAT, np.full(5000, 32), rng)
    # the prior (mean 211, ~8% below 32) now weighs 50·50/2050 ≈ 1.2 vs 2000 observations
    assert (s < 32).mean() < 0.005
    d = m.distribution("tiny", CHAT)
    assert d.current_prior_weight() == pytest.approx(50 * 50 / 2050)
    # other models still use the prior alone
    assert 190 < m.sample("other", CHAT, np.full(5000, 4096), rng).mean() < 230


def test_online_learning_shifts_towards_observed_lengths():
    m = LengthModel()
    rng = np.random.default_rng(6)
    for v in np.random.default_rng(7).integers(5, 15, 500):
        m.observe("terse", CHAT, int(v), capped=False)
    s = m.sample("terse", CHAT, np.full(5000, 4096), rng)
    assert np.median(s) < 15 and s.mean() < 25


def test_embeddings_cost_one_step_and_are_not_learned():
    m = LengthModel()
    assert np.all(m.sample("e", "/v1/embeddings", np.full(5, 100), np.random.default_rng(0)) == 1)
    m.observe("e", "/v1/embeddings", 1, capped=False)
    assert m.to_dict()["distributions"] == []


def test_round_trip_through_json_preserves_samples():
    m = LengthModel()
    for v in (3, 9, 27):
        m.observe("a", CHAT, v, capped=False)
    m.observe("a", CHAT, 50, capped=True)
    m.observe("b", "/v1/completions", 7, capped=False)
    back = LengthModel.from_dict(json.loads(json.dumps(m.to_dict())))
    caps = np.full(300, 200)
    for model, ep in (("a", CHAT), ("b", "/v1/completions")):
        x = m.sample(model, ep, caps, np.random.default_rng(8))
        y = back.sample(model, ep, caps, np.random.default_rng(8))
        assert np.array_equal(x, y)
    assert back.distribution("a", CHAT).num_observations == 4


def test_sampling_is_deterministic_given_the_generator():
    m = LengthModel()
    caps = np.full(100, 1000)
    a = m.sample("x", CHAT, caps, np.random.default_rng(11))
    b = m.sample("x", CHAT, caps, np.random.default_rng(11))
    assert np.array_equal(a, b)


def test_prompt_estimates_are_corrected_by_what_engines_counted() -> None:
    """Validation estimates prompts from characters (`gateway.tokens`); the engines' counts teach
    each (model, endpoint) the ratio. `bench.fresh`'s prompts (random vocabulary words) were
    estimated 25 % long (18,684 tokens against 14,916 for medium's 64 of batch 2, 5 Dec 2026),
    which planned their prefill 25 % long."""
    lm = LengthModel()
    assert lm.prompt_scale("m", CHAT) == 1.0  # nothing seen: the estimate as it is
    lm.observe_prompt("m", CHAT, estimated=100, counted=80)
    assert 0.8 < lm.prompt_scale("m", CHAT) < 1.0  # one answer moves it, a prior holds it back
    for _ in range(200):
        lm.observe_prompt("m", CHAT, estimated=100, counted=80)
    assert lm.prompt_scale("m", CHAT) == pytest.approx(0.8, abs=0.01)
    assert lm.prompt_scale("other", CHAT) == 1.0
    for _ in range(2000):  # the texts change: the newest answers weigh most
        lm.observe_prompt("m", CHAT, estimated=100, counted=120)
    assert lm.prompt_scale("m", CHAT) == pytest.approx(1.2, abs=0.02)
    back = LengthModel.from_dict(json.loads(json.dumps(lm.to_dict())))
    assert back.prompt_scale("m", CHAT) == lm.prompt_scale("m", CHAT)
