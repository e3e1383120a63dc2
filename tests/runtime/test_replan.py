"""Building the planner's inputs from observed state; request transitions; the length-model store."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.executor_api import WorkItem
from runtime.persist import load_length_model, save_length_model, save_profile
from runtime.executor.pool_state import Req, ReqState, TransitionError
from runtime.executor.planning import running_plans, sample_work
from runtime.executor.latency_source import (DEFAULT_CPU_LOAD_S, DEFAULT_CPU_SPAWN_LOAD_S,
                                             DEFAULT_CPU_TP_COLD_S, LatencySource)
from scheduler.latency import LatencyModel, Profile, analytic_latency_model
from scheduler.lengths import LengthModel
from scheduler.types import DevicePool, ModelSpec

SPEC = ModelSpec("a", num_layers=2, hidden_size=128, num_heads=2, num_kv_heads=1,
                 intermediate_size=512, vocab_size=2048)


def req(i: int, model: str = "a", url: str = "/v1/chat/completions", cap: int = 16) -> Req:
    return Req("b", WorkItem(line=i, custom_id=f"r{i}", model=model, url=url, body={},
                             prompt_tokens=10 + i, max_tokens=cap))


def test_sample_work_caps_lengths_and_keeps_prompts() -> None:
    lm = LengthModel()
    for _ in range(50):
        lm.observe("a", "/v1/chat/completions", 500, capped=False)  # long natural endings
    reqs = [req(i, cap=4 + i) for i in range(6)] + [req(9, "e", "/v1/embeddings")]
    work = sample_work(reqs, lm, np.random.default_rng(0))
    a = {r.rid: r for r in work["a"]}
    assert all(a[i].output_len <= 4 + i and a[i].prompt_len == 10 + i for i in range(6))
    assert [(r.rid, r.output_len) for r in work["e"]] == [(6, 1)]


def test_running_plans_group_replicas_per_model() -> None:
    plans = running_plans([("a", 1, (2,)), ("a", 1, (0,)), ("b", 2, (4, 5))])
    assert (plans["a"].tp, plans["a"].dp, plans["a"].devices) == (1, 2, (0, 2))
    assert (plans["b"].tp, plans["b"].dp, plans["b"].devices) == (2, 1, (4, 5))


def test_latency_source_prefers_profiles_and_measured_starts(tmp_path) -> None:
    pool = DevicePool("cpu", (0, 1), 1 << 28)
    measured = LatencyModel(1e-3, 2e-5, 0.0, 1e-7, 1e-4, load_time_s=12.0)
    save_profile(tmp_path, Profile("a", 1, "cpu", measured, {}))
    src = LatencySource.load(tmp_path, pool, ["a"], {("a", 2, 1): 40.0})
    assert src(SPEC, 1) == measured  # the stored profile, its load time included
    # no profile: analytic, with the start time this runtime measured and, never served at TP 2,
    # a TP-2 engine's first requests
    tp2 = src(SPEC, 2)
    assert tp2.c1 == analytic_latency_model(SPEC, 2, "cpu").c1
    assert tp2.load_time_s == 40.0 + DEFAULT_CPU_TP_COLD_S
    fresh = LatencySource.load(tmp_path / "none", pool, ["a"], {})
    assert fresh(SPEC, 1).load_time_s == DEFAULT_CPU_LOAD_S


def test_a_rank_on_several_cores_is_priced_its_own_slower_start(tmp_path) -> None:
    """One core per rank forks its engine processes, a rank on several spawns them
    (`runtime.engines.api_server`): a start measured (or profiled) for one shape is not the
    other's."""
    pool = DevicePool("cpu", (0, 1), 1 << 28)
    fresh = LatencySource.load(tmp_path, pool, ["a"], {})
    assert fresh.threads(SPEC, 1, 2).load_time_s == DEFAULT_CPU_SPAWN_LOAD_S
    assert DEFAULT_CPU_SPAWN_LOAD_S > 3 * DEFAULT_CPU_LOAD_S
    measured = LatencySource.load(tmp_path, pool, ["a"], {("a", 1, 1): 2.5, ("a", 1, 2): 13.0})
    assert measured(SPEC, 1).load_time_s == 2.5
    assert measured.threads(SPEC, 1, 2).load_time_s == 13.0
    save_profile(tmp_path, Profile("a", 1, "cpu", LatencyModel(1e-3, 2e-5, 0.0, 1e-7, 1e-4,
                                                                load_time_s=3.0), {}))
    profiled = LatencySource.load(tmp_path, pool, ["a"], {})
    assert profiled(SPEC, 1).load_time_s == 3.0
    assert profiled.threads(SPEC, 1, 2).load_time_s == DEFAULT_CPU_SPAWN_LOAD_S


def test_request_transitions_are_guarded() -> None:
    r = req(1)
    r.dispatch()
    assert (r.state, r.attempts) == (ReqState.INFLIGHT, 1)
    r.requeue()
    r.dispatch()
    r.report()
    with pytest.raises(TransitionError):
        r.cancel()  # an answered request cannot be cancelled any more
    r.done()
    assert r.state.finished and r.attempts == 2


def test_length_model_store_round_trip_and_corruption(tmp_path) -> None:
    lm = LengthModel()
    lm.observe("a", "/v1/chat/completions", 42, capped=True)
    save_length_model(tmp_path, lm)
    back = load_length_model(tmp_path)
    assert back.to_dict() == lm.to_dict()
    (tmp_path / "lengths.json").write_text("{not json")
    assert load_length_model(tmp_path).to_dict() == LengthModel().to_dict()
    assert not list(tmp_path.glob(".lengths-*"))  # no temp files left behind


def test_a_profiles_cold_start_cost_is_charged_with_the_start(tmp_path) -> None:
    from runtime.executor.latency_source import cold_start_s

    pool = DevicePool("cpu", (0, 1), 1 << 28)
    lat = LatencyModel(1e-3, 2e-5, 0.0, 1e-7, 1e-4, load_time_s=30.0)
    cal = {"token_scale": 1.2, "step_scale": 1.1, "first_request_s": 2.0, "new_shape_s": 0.05,
           "sets": [{"name": "prefill", "new_shapes": 10}, {"name": "mixed", "new_shapes": 40}]}
    assert cold_start_s({"served_calibration": cal}) == pytest.approx(2.0 + 0.05 * 40)
    assert cold_start_s({}) == 0.0 and cold_start_s({"served_calibration": {"sets": "x"}}) == 0.0
    save_profile(tmp_path, Profile("a", 1, "cpu", lat, {"served_calibration": cal}))
    src = LatencySource.load(tmp_path, pool, ["a"], {})
    assert src(SPEC, 1).load_time_s == pytest.approx(34.0)  # profile start + cold cost
    measured = LatencySource.load(tmp_path, pool, ["a"], {("a", 1, 1): 20.0})
    assert measured(SPEC, 1).load_time_s == pytest.approx(24.0)  # measured start + cold cost
    assert measured(SPEC, 1).c1 == lat.c1


def test_build_problem_carries_the_spares_and_latency_no_longer_adds_the_import(tmp_path) -> None:
    """Start times are those of starts in a spare; the spare count and the import cost go to the
    planner, which hands the spares out over the stages (`scheduler.stages`)."""
    latency = LatencySource({}, "cpu", {("a", 1, 1): 15.0})
    assert latency(SPEC, 1).load_time_s == 15.0
    assert LatencySource({}, "cpu", {})(SPEC, 1).load_time_s == DEFAULT_CPU_LOAD_S
    from runtime.executor.planning import build_problem
    from scheduler.types import SimRequest
    from tests.runtime.executor_kit import make_cfg

    pool = DevicePool("cpu", (0, 1), 1 << 28)
    args = (make_cfg(tmp_path), pool, {"a": SPEC}, latency, {"a": [SimRequest(0, 10, 10)]}, {}, 0)
    problem = build_problem(*args, spares=(0.0, 3.5), no_spare_s=7.0)
    assert (problem.spares, problem.no_spare_s) == ((0.0, 3.5), 7.0)
    assert build_problem(*args).spares is None


def test_sample_work_scales_prompt_estimates_by_what_engines_counted() -> None:
    lm = LengthModel()
    for _ in range(500):
        lm.observe_prompt("a", "/v1/chat/completions", estimated=100, counted=50)
    r = req(90)  # estimated 100 prompt tokens
    r.known_tokens = 7  # upstream outputs: counted, not estimated
    [got] = sample_work([r], lm, np.random.default_rng(0))["a"]
    assert got.prompt_len == pytest.approx(100 * lm.prompt_scale("a", "/v1/chat/completions") + 7,
                                           abs=1) and got.prompt_len < 60


async def test_served_prompts_teach_the_estimate_and_are_kept(tmp_path) -> None:
    """Each answer's counted prompt (the fake engine says 5 tokens, validation estimated 20) moves
    the model's prompt scale, and it is saved with the lengths."""
    from tests.runtime.fakes import FakeLauncher
    from tests.runtime.executor_kit import items, make_cfg, run_once
    ex = await run_once(make_cfg(tmp_path), FakeLauncher(), DevicePool("cpu", (0,), 1 << 28),
                        items("a", 40))
    scale = ex.learned.lengths.prompt_scale("a", "/v1/chat/completions")
    assert 0.25 < scale < 0.9
    saved = load_length_model(tmp_path / "state")
    assert saved.prompt_scale("a", "/v1/chat/completions") == pytest.approx(scale)
