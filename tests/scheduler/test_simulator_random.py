"""The simulator's fast paths (implicit decoders, jumps, the preemption pass that visits only the
decoders needing a block) against the literal vLLM loop on random small engines, preemption-heavy."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler.simulator import EngineLimits, simulate
from tests.scheduler.test_simulator import LAT, reference, workload


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
