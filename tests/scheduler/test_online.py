"""Online calibration (scheduler.served, scheduler.online, scheduler.unserved): the fit recovers
an engine's known speed from what it served, windows stay bounded, unserved shapes are derived
from served ones."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from scheduler.calibration import scale_latency
from scheduler.latency import LatencyModel
from scheduler.online import (ShapeFit, coefficients, fit_shape, refit, windows_from_dict,
                              windows_to_dict)
from scheduler.served import (Pending, Run, Served, ServedLog, ShapeWindow, busy_periods,
                              run_from_dict)
from scheduler.simulator import EngineLimits, kv_blocks, simulate
from scheduler.types import ModelSpec, SimRequest
from scheduler.unserved import correction

SPEC = ModelSpec("small", 4, 256, 4, 2, 1024, 2048, max_model_len=1024, max_num_seqs=16,
                 max_num_batched_tokens=1024)
# the base the scales apply to: a roofline of fixed constants (20 GFLOP/s, 10 GB/s, 4 ms per
# step), so these tests of the fit do not move when the CPU roofline is refit to measurements
BASE = LatencyModel(SPEC.weight_bytes / 10e9 + 4e-3, SPEC.flops_per_token / 20e9,
                    4.0 * SPEC.hidden_size * SPEC.num_layers / 20e9,
                    SPEC.kv_bytes_per_token(1) / 10e9, 5e-5)
LIMITS = EngineLimits(16, 1024, 1024, kv_blocks(SPEC, 1, 1 << 28))


def served_by(true, n: int = 300, gap_s: float = 0.0, seed: int = 0,
              in_flight: int | None = None) -> tuple[Served, ...]:
    """What an engine of latency `true` serves: n mixed requests, the i-th queued (and sent) at
    i·gap_s, answered at its simulated finish. `in_flight`: as the executor sends them instead,
    every request queued from the start and sent when an answer leaves room (the i-th once the
    (i - in_flight)-th was answered)."""
    rng = np.random.default_rng(seed)
    reqs = [SimRequest(i, int(rng.integers(20, 600)), int(rng.integers(5, 200)), arrival_s=i * gap_s)
            for i in range(n)]
    deps = {i: [i - in_flight] for i in range(in_flight, n)} if in_flight else None
    done = simulate(reqs, LIMITS, true, depends=deps).finish_times_s
    sent = [done[i - in_flight] if in_flight and i >= in_flight else r.arrival_s
            for i, r in enumerate(reqs)]
    return tuple(Served(r.arrival_s, sent[i], done[i], r.prompt_len, r.output_len)
                 for i, r in enumerate(reqs))


@pytest.mark.parametrize("gap_s", [0.0, 0.05], ids=["queued-at-start", "arriving"])
def test_the_fit_recovers_an_engines_known_scales(gap_s: float) -> None:
    true = scale_latency(BASE, 3.0, 5.0)  # per-token terms 3x, per-step terms 5x the roofline
    served = served_by(true, gap_s=gap_s)
    fit = fit_shape(BASE, "roofline", LIMITS, ShapeWindow((Run(served),), len(served)))
    assert fit is not None and fit.served == 300 and fit.kind == "roofline"
    assert fit.token_scale == pytest.approx(3.0, rel=0.02)
    assert fit.step_scale == pytest.approx(5.0, rel=0.02)
    before, after = fit.replay_errors()
    assert before < -0.6 and abs(after) < 1e-3  # -70 % before, exact after


def test_a_fresh_engines_late_first_answers_are_a_start_cost_not_a_slower_engine() -> None:
    """Every answer of a fresh engine's first busy period 3 s late (a TP 2 CPU engine's first
    request): the scales are those of the engine, the 3 s its fresh-start cost."""
    true = scale_latency(BASE, 3.0, 5.0)
    served = tuple(dataclasses.replace(s, done_s=s.done_s + 3.0) for s in served_by(true))
    fit = fit_shape(BASE, "roofline", LIMITS, ShapeWindow((Run(served),), len(served)))
    assert fit is not None and fit.first_s == pytest.approx(3.0, rel=0.03)
    assert fit.token_scale == pytest.approx(3.0, rel=0.02)
    assert fit.step_scale == pytest.approx(5.0, rel=0.02)
    assert abs(fit.replay_errors()[1]) < 1e-3
    # a warm one's first answers are not late: nothing is charged
    assert fit_shape(BASE, "roofline", LIMITS, ShapeWindow((Run(served_by(true)),), 300)
                     ).first_s == 0.0


def test_a_fresh_engines_new_token_counts_are_a_start_cost_not_a_slower_engine() -> None:
    """A fresh engine paying 50 ms the first time it runs a step of a token count (a CPU engine's
    kernels built per shape): the scales are the warm engine's, 50 ms per count its start cost."""
    true = scale_latency(BASE, 2.0, 4.0)
    rng = np.random.default_rng(3)
    reqs = [SimRequest(i, int(rng.integers(20, 600)), int(rng.integers(5, 200))) for i in range(200)]
    res = simulate(reqs, LIMITS, true, record=True)
    ends = np.cumsum([it.duration_s for it in res.iterations])
    counts = [it.num_tokens for it in res.iterations]
    new = np.cumsum([counts.index(c) == k for k, c in enumerate(counts)])
    late = {rid: 0.05 * new[int(np.argmin(np.abs(ends - t)))] for rid, t in res.finish_times_s.items()}
    served = tuple(Served(0.0, 0.0, res.finish_times_s[r.rid] + late[r.rid], r.prompt_len,
                          r.output_len) for r in reqs)
    fit = fit_shape(BASE, "roofline", LIMITS, ShapeWindow((Run(served),), 200))
    assert fit is not None and fit.new_shape_s == pytest.approx(0.05, rel=0.05)
    assert fit.shapes == len(set(counts)) and fit.cold_s == pytest.approx(0.05 * fit.shapes, rel=0.05)
    assert (fit.token_scale, fit.step_scale) == pytest.approx((2.0, 4.0), rel=0.03)
    assert abs(fit.replay_errors()[1]) < 0.01


def test_requests_of_one_shape_move_both_scales_alike() -> None:
    """Identical requests cannot tell per-token from per-step costs apart: both scales move alike
    (the weak pull toward equal scales), and the served total is still matched."""
    reqs = [SimRequest(i, 50, 40) for i in range(64)]
    res = simulate(reqs, LIMITS, scale_latency(BASE, 4.0, 4.0))
    served = tuple(Served(0.0, 0.0, res.finish_times_s[i], 50, 40) for i in range(64))
    fit = fit_shape(BASE, "roofline", LIMITS, ShapeWindow((Run(served),), 64))
    assert fit is not None
    assert fit.token_scale == pytest.approx(4.0, rel=0.01)
    assert fit.step_scale == pytest.approx(4.0, rel=0.01)


def test_too_few_answers_give_no_fit() -> None:
    served = served_by(BASE, n=5)
    assert fit_shape(BASE, "roofline", LIMITS, ShapeWindow((Run(served),), 5)) is None


def test_busy_periods_split_where_the_engine_had_nothing_in_flight() -> None:
    run = Run((Served(-5.0, 0.0, 1.0, 10, 4), Served(0.2, 0.5, 1.5, 10, 4),
               Served(3.0, 3.0, 4.0, 10, 4)))  # idle from 1.5 to 3.0
    first, second = busy_periods(run)
    assert [r.arrival_s for r in first.requests] == [0.0, 0.2]  # queued before the start: 0
    assert first.measured == (1.0, 1.5) and second.measured == (1.0,)
    assert first.skip == 0


def test_the_window_keeps_each_runs_start_and_its_newest_requests() -> None:
    log = ServedLog(window=16)  # a head of 4 per run
    key = ("m", 1, 1, "cpu")
    for i in range(40):
        log.add(key, "engine-1" if i < 30 else "engine-2", Served(i, i, i + 0.5, 10, 4))
    (w,) = log.snapshot().values()
    assert w.seen == 40 and sum(len(r.served) for r in w.runs) == 16
    head, tail, new = w.runs
    assert [s.sent_s for s in head.served] == [0, 1, 2, 3] and head.end_s == 4
    assert tail.trimmed and [s.sent_s for s in tail.served] == [28, 29]
    assert not new.trimmed and new.end_s is None and len(new.served) == 10
    # a run's newest requests are matched from the answer after those sent before it; its
    # start up to the first dropped request's send
    cut = Run((Served(0, 0, 2, 1, 1), Served(0, 1, 3, 1, 1), Served(0, 2.5, 4, 1, 1)), trimmed=True)
    assert busy_periods(cut)[0].skip == 2
    start = Run((Served(0, 0, 2, 1, 1), Served(0, 1, 3, 1, 1), Served(0, 1.5, 5, 1, 1)), end_s=4.0)
    assert busy_periods(start)[0].upto == 2
    # stored windows come back as closed runs and are kept within the window
    again = ServedLog.from_windows(log.snapshot(), window=8)
    assert sum(len(r.served) for r in again.snapshot()[key].runs) == 8


def test_an_interrupted_run_is_matched_only_where_the_window_holds_all_the_engine_did() -> None:
    """Requests aborted on an engine (a small batch preempting a big one, a replica taking over
    queued ones) did work no answer records: answers after the first of them was sent are not
    matched, and what the engine serves next is a run whose first requests queued behind them.
    Matched, the fairness bench's medium engine looked 2-3x slower after an abort of 48 in its
    first second, and the next plan put medium on both cores (predicted 76.9 s against 42.9 s,
    5 Dec 2026)."""
    log = ServedLog(window=100)
    key = ("m", 1, 1, "cpu")
    for i in range(4):
        log.add(key, 7, Served(0, i * 0.1, 1 + i * 0.1, 10, 5))
    log.interrupt(key, 7, 0.05)  # the aborted ones: sent from 0.05 on
    log.interrupt(key, 8, 0.0)  # a run never seen: nothing to cut
    for i in range(3):
        log.add(key, 7, Served(1.5, 1.5, 2 + i * 0.1, 10, 5))
    (w,) = log.snapshot().values()
    before, after = w.runs
    assert len(before.served) == 4 and before.end_s == 0.05 and not before.trimmed
    assert busy_periods(before)[0].upto == 0  # every answer came after the abort's work began
    assert after.trimmed and len(after.served) == 3 and after.end_s is None
    # through a store and back: the same answers matched
    *cut, last = ServedLog.from_windows(log.snapshot()).snapshot()[key].runs
    assert sum(len(r.served) for r in cut) == 4 and all(r.end_s == 0.05 for r in cut)
    assert all(p.upto == 0 for r in cut for p in busy_periods(r))
    assert last.trimmed and len(last.served) == 3 and last.end_s is None


@pytest.mark.parametrize("window", [400, 200], ids=["whole", "trimmed"])
def test_the_fit_recovers_an_engine_fed_as_the_executor_feeds_it(window: int) -> None:
    """1.5 x max_num_seqs in flight, the next request sent as an answer comes: the replay with
    every request queued from the start matches, also on a window that lost its oldest half."""
    true = scale_latency(BASE, 2.0, 6.0)
    log = ServedLog(window=window)
    for s in served_by(true, n=400, in_flight=24):
        log.add(("small", 1, 1, "cpu"), 1, s)
    (w,) = log.snapshot().values()
    assert len(w.runs) == (2 if window < 400 else 1)
    fit = fit_shape(BASE, "roofline", LIMITS, w)
    assert fit is not None and abs(fit.replay_errors()[1]) < 0.03
    assert fit.token_scale == pytest.approx(2.0, rel=0.1)
    assert fit.step_scale == pytest.approx(6.0, rel=0.1)


@pytest.mark.parametrize("answered", [20, 40, 80])
def test_requests_in_flight_are_replayed_beside_the_answers_they_shared_steps_with(
        answered: int) -> None:
    """A window taken mid-run, as the executor refits before a plan: the engine's last answers
    shared their steps with requests still in flight (their prefill ran between two decode steps).
    Replayed without them, a (3, 5) engine's first 40-80 answers read as (1.7, 14) here, and the
    fairness bench's `medium` as 5x slower steps from its first wave; replayed beside them, to
    their output caps (not their true lengths, unknown then), the scales are the engine's."""
    true = scale_latency(BASE, 3.0, 5.0)
    served = served_by(true, n=200, in_flight=24)
    now = sorted(s.done_s for s in served)[answered - 1]
    log = ServedLog()
    for s in served:
        if s.done_s <= now:
            log.add(("small", 1, 1, "cpu"), 1, s)
    flying = [Pending(s.queued_s, s.sent_s, s.prompt_tokens, 400) for s in served
              if s.sent_s <= now < s.done_s]
    assert len(flying) == 24
    (w,) = log.snapshot({(("small", 1, 1, "cpu"), 1): flying}).values()
    fit = fit_shape(BASE, "roofline", LIMITS, w)
    assert fit is not None and fit.served >= answered  # (ties: answers of one step)
    if answered >= 40:  # 20 answers, most of one wave, tell the two terms apart less well
        assert fit.token_scale == pytest.approx(3.0, rel=0.02)
        assert fit.step_scale == pytest.approx(5.0, rel=0.02)
    # what a plan needs: the whole run as the planner simulates it (from 20 answers: 3 % short,
    # where without the requests in flight it was 1.45x)
    reqs = [SimRequest(i, s.prompt_tokens, s.output_tokens) for i, s in enumerate(served)]
    predicted = simulate(reqs, LIMITS, scale_latency(BASE, fit.token_scale, fit.step_scale))
    assert predicted.total_time_s == pytest.approx(simulate(reqs, LIMITS, true).total_time_s,
                                                   rel=0.03)


def test_requests_in_flight_go_with_their_engines_newest_run_and_are_never_stored() -> None:
    log = ServedLog(window=100)
    key = ("m", 1, 1, "cpu")
    for i in range(3):
        log.add(key, "old", Served(0, i, i + 1, 10, 4))
        log.add(key, "new", Served(10, 10 + i, 11 + i, 10, 4))
    flying = {(key, "new"): [Pending(10, 10.5, 10, 64), Pending(5, 9.0, 10, 64)],
              (key, "gone"): [Pending(0, 0, 10, 64)], (("x", 1, 1, "cpu"), "new"): []}
    old, new = log.snapshot(flying)[key].runs
    # sent before the run's first request: not behind its start (a long request of a trimmed
    # run's dropped middle), left out
    assert old.pending == () and new.pending == (Pending(10, 10.5, 10, 64),)
    (period,) = busy_periods(new)
    assert len(period.requests) == 4 and period.pending == (1,)  # sent second: rid 1
    assert period.measured == (1.0, 2.0, 3.0)  # its answer is never matched
    assert all(r.pending == () for r in log.snapshot()[key].runs)
    assert "pending" not in json.dumps(windows_to_dict(log.snapshot(flying), {}))
    # a run interrupted (its in-flight requests aborted): what it sends next is a run of its own
    log.interrupt(key, "new", 12.0)
    log.add(key, "new", Served(13, 13, 14, 10, 4))
    *_, cut, after = log.snapshot({(key, "new"): [Pending(13, 13.5, 10, 64)]})[key].runs
    assert cut.pending == () and after.pending == (Pending(13, 13.5, 10, 64),)


@pytest.mark.parametrize("at_s", [10.0, 15.0])
def test_like_requests_keep_the_profiles_split_and_predict_the_rest_of_the_run(at_s: float
                                                                                ) -> None:
    """A real `medium` engine's run (`medium_run.json`: 300 like requests, 40 tokens in and 32 out,
    in waves of 32 and their sub-waves), fitted over its profile from the answers of its first
    10 or 15 s and the requests then in flight: the rest of the run is predicted within 5 %. With
    the weak pull toward equal scales a roofline gets, the fit went to 0.46x per token and 2.7x
    per step and the rest came out 10 % long (13-14 % in the median of 26 such runs)."""
    fixture = json.loads((Path(__file__).parent / "medium_run.json").read_text())
    base, limits = LatencyModel(*fixture["base"]), EngineLimits(**fixture["limits"])
    run = run_from_dict(fixture["run"])
    (whole,) = busy_periods(run)
    answered = tuple(s for s in run.served if s.done_s <= at_s)
    flying = tuple(Pending(s.queued_s, s.sent_s, s.prompt_tokens, 32) for s in run.served
                   if s.sent_s <= at_s < s.done_s)
    fit = fit_shape(base, "profile", limits,
                    ShapeWindow((Run(answered, pending=flying),), len(answered)))
    assert fit is not None and 0.5 < fit.token_scale / fit.step_scale < 2.0
    replay = sorted(simulate(whole.requests, limits, scale_latency(
        base, fit.token_scale, fit.step_scale)).finish_times_s.values())
    k = len(answered) - 1
    rest = (replay[-1] - replay[k]) / (whole.measured[-1] - whole.measured[k])
    assert rest == pytest.approx(1.0, abs=0.05)


def test_refit_reuses_a_current_fit_and_redoes_a_stale_one() -> None:
    key = ("small", 1, 1, "cpu")
    served = served_by(scale_latency(BASE, 2.0, 2.0), n=40)
    windows = {key: ShapeWindow((Run(served),), 40)}
    fits = refit(windows, {key: (BASE, "roofline", LIMITS)}, {})
    assert fits[key].token_scale == pytest.approx(2.0, rel=0.02)
    assert refit(windows, {key: (BASE, "roofline", LIMITS)}, fits) is fits  # nothing new
    profile = scale_latency(BASE, 2.0, 2.0)  # a profile measured since: the scales are redone
    again = refit(windows, {key: (profile, "profile", LIMITS)}, fits)
    assert again[key].kind == "profile" and again[key].token_scale == pytest.approx(1.0, rel=0.02)
    other = ("small", 1, 1, "a100")  # a shape this pool has no base for keeps its fit
    assert refit({}, {}, {other: fits[key]}) == {other: fits[key]}


def _fit(token: float, step: float, kind: str = "roofline", measured: float = 10.0) -> ShapeFit:
    """A fit whose served time was `measured` against 5 s replayed under the base."""
    return ShapeFit(token, step, 50, 1, measured, 5.0, measured, kind, coefficients(BASE), 50)


def test_an_unserved_shape_is_derived_from_the_models_served_shapes() -> None:
    fits = {("a", 1, 1, "cpu"): _fit(2.0, 4.0),
            ("b", 1, 1, "cpu"): _fit(1.0, 3.0), ("b", 2, 1, "cpu"): _fit(1.5, 6.0)}
    own = correction(fits, ("a", 1, 1, "cpu"), "roofline")
    assert own is not None and (own.source, own.token_scale, own.step_scale) == ("online", 2.0, 4.0)
    # a at TP 2: a's TP 1 scales times the TP 2 / TP 1 ratio b showed on this device kind
    tp2 = correction(fits, ("a", 2, 1, "cpu"), "roofline")
    assert tp2 is not None and tp2.source == "derived"
    assert (tp2.token_scale, tp2.step_scale) == pytest.approx((3.0, 8.0))
    assert "TP2/TP1 of b" in tp2.detail
    # no other model ran both shapes: a's own scales, the base's own ratio
    alone = correction({("a", 1, 1, "cpu"): _fit(2.0, 4.0)}, ("a", 1, 2, "cpu"),
                       "roofline, threads assumed")
    assert alone is not None and (alone.token_scale, alone.step_scale) == (2.0, 4.0)
    # a model never served: the other models' fits at this shape
    # (their overall factors, measured over replayed: 2 for each of _fit's)
    c = correction(fits | {("b", 1, 1, "cpu"): _fit(1.0, 3.0, measured=24.0)},
                   ("c", 1, 1, "cpu"), "roofline")
    assert c is not None and c.detail == "from a, b at this shape"
    assert (c.token_scale, c.step_scale) == pytest.approx((math.sqrt(2.0 * 4.8),) * 2)
    # a profiled shape is not corrected by the roofline's scales of the same model, nor of others
    assert correction({("a", 1, 1, "cpu"): _fit(2.0, 4.0)}, ("a", 2, 1, "cpu"), "profile") is None
    assert correction(fits, ("c", 1, 1, "cpu"), "profile") is None
    assert correction(fits, ("a", 1, 1, "a100"), "gpu-model") is None  # another device kind


def test_windows_and_fits_round_trip_through_json() -> None:
    key = ("small", 1, 1, "cpu")
    log = ServedLog()
    for s in served_by(BASE, n=20):
        log.add(key, 7, Served(s.queued_s + 100, s.sent_s + 100, s.done_s + 100, s.prompt_tokens,
                               s.output_tokens))
    windows = log.snapshot()
    fits = refit(windows, {key: (BASE, "roofline", LIMITS)}, {})
    back_w, back_f = windows_from_dict(json.loads(json.dumps(windows_to_dict(windows, fits))))
    assert back_f == fits
    (run,) = back_w[key].runs
    assert run.served[0].sent_s == 0.0 and len(run.served) == 20  # times from the run's start
    assert back_w[key].seen == 20
    assert refit(back_w, {key: (BASE, "roofline", LIMITS)}, back_f) is back_f
    with pytest.raises(ValueError):
        windows_from_dict({"version": 2, "shapes": []})


def test_a_shape_no_model_served_is_corrected_like_the_shapes_that_were() -> None:
    """medium never served, tiny-a served at TP 1 only: medium's TP 1 took tiny-a's scales and its
    TP 2 none, so medium TP 2 looked 1.6x faster beside TP 1 than its profiles say, and a re-plan
    3 s into the fairness bench's mix put both running engines to sleep for a medium engine on
    both cores (73 s predicted against 43 s; the big batch took 60 s against 40 s alone, 6 Dec
    2026). A shape nothing tells about gets what every served shape of its family says (the
    machine serving slower or faster than its bases), so the shapes compare as their bases do."""
    # tiny-a served 1.6x its profile (measured 8 s against 5 s replayed), split as 5.15 / 0.02
    fits = {("tiny-a", 1, 1, "cpu"): _fit(5.15, 0.02, "profile", measured=8.0)}
    tp1 = correction(fits, ("medium", 1, 1, "cpu"), "profile")
    tp2 = correction(fits, ("medium", 2, 1, "cpu"), "profile")
    assert tp1 is not None and tp2 is not None and tp2.source == "derived"
    # lent as its overall factor on both terms: medium's own split is not tiny-a's
    assert (tp2.token_scale, tp2.step_scale) == (tp1.token_scale, tp1.step_scale)
    assert (tp2.token_scale, tp2.step_scale) == pytest.approx((1.6, 1.6))
    assert "every served shape" in tp2.detail
    # the geometric mean of all the family's fits; the other family's say nothing
    more = fits | {("small", 2, 1, "cpu"): _fit(0.4, 3.6, "profile", measured=2.5),
                   ("small", 1, 1, "cpu"): _fit(9.0, 9.0, "roofline", measured=45.0)}
    t2 = correction(more, ("medium", 1, 2, "cpu"), "profile")
    assert t2 is not None and (t2.token_scale, t2.step_scale) == pytest.approx((0.8 ** 0.5,) * 2)
    assert correction(fits, ("medium", 2, 1, "a100"), "profile") is None  # another device kind


def test_a_wave_the_replay_lacks_does_not_read_as_a_many_times_slower_engine() -> None:
    """A run matched from an answer on (its start queued behind requests the window does not
    hold): the engine answered its last 8 requests 0.6 s after the rest, a wave later than the
    replay has them (work the window never saw held seats), where the replay has them one step
    after the reference answer. Fitted, those increments read as an engine 50x slower than it
    was (28x from 16 answers of a woken `medium` engine, the fairness bench of 6 Dec 2026)."""
    reqs = [SimRequest(i, 39, 32, arrival_s=0.0) for i in range(24)]
    reqs += [SimRequest(24 + j, 39, 33 if j >= 4 else 32, arrival_s=0.8) for j in range(8)]
    fin = simulate(reqs, LIMITS, BASE).finish_times_s
    late = {r.rid: 0.6 if r.rid >= 24 else 0.0 for r in reqs}
    served = tuple(sorted((Served(r.arrival_s, r.arrival_s, fin[r.rid] + late[r.rid], 39,
                                  r.output_len) for r in reqs), key=lambda s: s.sent_s))
    fit = fit_shape(BASE, "roofline", LIMITS,
                    ShapeWindow((Run(served, trimmed=True),), len(served)))
    assert fit is None or max(fit.token_scale, fit.step_scale) < 3.0
