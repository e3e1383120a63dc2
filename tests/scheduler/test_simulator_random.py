"""The simulator's fast paths (implicit decoders, jumps, the preemption pass that visits only the
decoders needing a block) against the literal vLLM loop on random small engines, preemption-heavy;
then with random arrivals and same-run dependencies (no request admitted before its arrival or
before what it waits for finished; jumping over quiet stretches gives the step-by-step result)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from scheduler.simulator import EngineLimits, simulate
from scheduler.types import SimRequest
from tests.scheduler.test_simulator import LAT, UNIT, reference, workload


@pytest.mark.parametrize("seed", range(40))
def test_random_engines_match_literal_vllm_loop(seed):
    rng = np.random.default_rng([seed, 11])
    seqs = int(rng.integers(1, 24))
    bs = int(rng.choice([4, 8, 16]))
    fit = -(-300 // bs)  # blocks of the longest request: every request fits alone
    lim = EngineLimits(seqs, int(rng.integers(max(16, seqs), 300)), 512,
                       int(rng.integers(fit, 3 * fit)), block_size=bs)
    reqs = workload(seed, int(rng.integers(1, 70)), max_prompt=120, max_out=160)
    ref_finish, ref_steps, ref_pre = reference(reqs, lim, LAT)
    for jump in (False, True):
        res = simulate(reqs, lim, LAT, jump=jump)
        assert (res.num_iterations, res.num_preemptions) == (ref_steps, ref_pre)
        assert res.finish_times_s.keys() == ref_finish.keys()
        for rid, t in ref_finish.items():
            assert res.finish_times_s[rid] == pytest.approx(t, rel=1e-9)


def _timed_workload(seed):
    """Random small engine and requests with random arrivals and random same-run dependencies."""
    rng = np.random.default_rng([seed, 23])
    seqs = int(rng.integers(1, 24))
    bs = int(rng.choice([4, 8, 16]))
    fit = -(-300 // bs)
    lim = EngineLimits(seqs, int(rng.integers(max(16, seqs), 300)), 512,
                       int(rng.integers(fit, 3 * fit)), block_size=bs)
    reqs = workload(seed, int(rng.integers(1, 70)), max_prompt=120, max_out=160)
    horizon = simulate(reqs, lim, LAT).total_time_s * float(rng.uniform(0.2, 1.5))
    reqs = [dataclasses.replace(r, arrival_s=float(rng.uniform(0, horizon)))
            if rng.random() < 0.6 else r for r in reqs]
    depends = {}
    for i, r in enumerate(reqs):  # a DAG: each request may wait for earlier ones
        if i and rng.random() < 0.3:
            depends[r.rid] = [reqs[j].rid for j in rng.choice(i, int(rng.integers(1, 3)))]
    return lim, reqs, depends


@pytest.mark.parametrize("seed", range(40))
def test_arrivals_and_dependencies_match_literal_loop_and_jumps_equal_steps(seed):
    lim, reqs, depends = _timed_workload(seed)
    ref_admit: dict[int, float] = {}
    ref_finish, ref_steps, ref_pre = reference(reqs, lim, LAT, depends, ref_admit)
    arrival = {r.rid: r.arrival_s for r in reqs}
    runs = [simulate(reqs, lim, LAT, jump=jump, depends=depends, admissions=True, record=True)
            for jump in (False, True)]
    for res in runs:
        assert (res.num_iterations, res.num_preemptions) == (ref_steps, ref_pre)
        assert res.finish_times_s.keys() == ref_finish.keys()
        for rid, t in ref_finish.items():
            assert res.finish_times_s[rid] == pytest.approx(t, rel=1e-9)
        assert res.admitted_s.keys() == ref_admit.keys()
        for rid, t in res.admitted_s.items():
            assert t == pytest.approx(ref_admit[rid], rel=1e-9)
            # never before its arrival, nor before what it waits for finished
            assert t >= arrival[rid] - 1e-12
            assert all(t >= res.finish_times_s[u] - 1e-12 for u in depends.get(rid, ()))
    step, jump = runs
    assert [it.num_tokens for it in step.iterations] == [it.num_tokens for it in jump.iterations]
    assert [it.batch_size for it in step.iterations] == [it.batch_size for it in jump.iterations]


@pytest.mark.parametrize("seed", range(10))
def test_a_cut_with_arrivals_is_a_prefix_and_keeps_what_is_still_to_come(seed):
    lim, reqs, depends = _timed_workload(seed)
    full = simulate(reqs, lim, LAT, depends=depends)
    cut_at = full.total_time_s * 0.5
    for jump in (True, False):
        cut = simulate(reqs, lim, LAT, until_s=cut_at, jump=jump, depends=depends)
        done = {rid for rid, t in full.finish_times_s.items() if t <= cut_at}
        assert set(cut.finish_times_s) == done and cut.total_time_s <= cut_at
        orig = {r.rid: r for r in reqs}
        left = {r.rid: r for r in cut.remaining}
        assert set(left) == set(orig) - done
        for rid, r in left.items():  # arrivals and upstream carried, nothing invented
            assert (r.arrival_s, r.upstream, r.prompt_len) == (
                orig[rid].arrival_s, orig[rid].upstream, orig[rid].prompt_len)


def test_idle_engine_waits_for_arrivals_and_releases_dependents_by_hand():
    lim = EngineLimits(4, 64, 128, 100)
    reqs = [SimRequest(0, 10, 3, arrival_s=10.0), SimRequest(1, 5, 2)]
    res = simulate(reqs, lim, UNIT, depends={1: [0]}, admissions=True)
    # idle until 10; 0: prefill [10, 11] + 2 decodes; 1 is released at 13: prefill + 1 decode
    assert res.finish_times_s == {0: 13.0, 1: 15.0}
    assert res.admitted_s == {0: 10.0, 1: 13.0}
    assert res.num_iterations == 5
    with pytest.raises(ValueError, match="cycle"):
        simulate([SimRequest(0, 5, 2), SimRequest(1, 5, 2)], lim, UNIT, depends={0: [1], 1: [0]})
