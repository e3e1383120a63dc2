"""Simulator against hand-computed cases and against a literal, slow transcription of vLLM V1's
schedule()/update_from_output() loop (explicit per-request state, one iteration at a time)."""

from __future__ import annotations

import time
from collections import deque

import numpy as np
import pytest

from scheduler.latency import LatencyModel
from scheduler.simulator import EngineLimits, kv_blocks, simulate
from scheduler.types import ModelSpec, SimRequest

UNIT = LatencyModel(1.0, 0.0, 0.0, 0.0, 0.0)  # every iteration takes 1 s: times count iterations
LAT = LatencyModel(5e-3, 2e-5, 1e-8, 3e-7, 1e-4)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def reference(requests, lim: EngineLimits, lat: LatencyModel, depends=None, admitted=None):
    """vLLM V1 FCFS scheduling written out literally; checks invariants every iteration. Requests
    join the waiting queue at their arrival (ties in input order) or, with `depends` (rid -> rids),
    when the last request they wait for finished; `admitted` (a dict) gets each request's first
    scheduled iteration's start."""
    bs, mml = lim.block_size, lim.max_model_len
    finish, waiting, running = {}, deque(), []
    later, blocked, states = [], {}, {}  # later: (arrival, index, state) not queued yet
    for idx, r in enumerate(requests):
        p = min(max(1, r.prompt_len), mml - 1)
        st = {"rid": r.rid, "P": p, "out": max(1, min(r.output_len, mml - p)), "g": r.generated,
              "comp": 0, "held": 0, "dec": False, "arr": r.arrival_s, "idx": idx}
        if st["g"] >= st["out"]:
            finish[r.rid] = 0.0
        else:
            states[r.rid] = st
    for rid, st in states.items():
        ups = {u for u in (depends or {}).get(rid, ()) if u in states and u != rid}
        if ups:
            blocked[rid] = ups
        elif st["arr"] > 0:
            later.append((st["arr"], st["idx"], st))
        else:
            waiting.append(st)
    free, now, steps, preemptions = lim.num_kv_blocks, 0.0, 0, 0
    while waiting or running or later:
        later.sort(key=lambda x: x[:2])
        if not waiting and not running:
            now = max(now, later[0][0])  # an idle engine waits for the next arrival
        while later and later[0][0] <= now:
            waiting.append(later.pop(0)[2])
        budget, sched, preempted = lim.max_num_batched_tokens, [], []
        idx = 0
        while idx < len(running) and budget > 0:
            r = running[idx]
            c = min(r["P"] + r["g"] - r["comp"], budget)
            need = cdiv(r["comp"] + c, bs) - r["held"]
            while need > free:
                v = running.pop()
                free += v["held"]
                v.update(held=0, comp=0, dec=False)
                waiting.appendleft(v)
                preempted.append(v)
                if v is r:
                    break
            if preempted and preempted[-1] is r:
                break
            free -= need
            r["held"] += need
            budget -= c
            sched.append((r, c))
            idx += 1
        if not preempted:
            while waiting and budget > 0 and len(running) < lim.max_num_seqs:
                r = waiting[0]
                c = min(r["P"] + r["g"], budget)
                if cdiv(c, bs) > free:
                    break
                waiting.popleft()
                free -= cdiv(c, bs)
                r["held"] = cdiv(c, bs)
                running.append(r)
                if admitted is not None:
                    admitted.setdefault(r["rid"], now)
                sched.append((r, c))
                budget -= c
        preemptions += len(preempted)
        assert sched, "no progress"
        tokens = sum(c for _, c in sched)
        assert tokens <= lim.max_num_batched_tokens and len(running) <= lim.max_num_seqs
        assert free >= 0 and free + sum(r["held"] for r in running) == lim.num_kv_blocks
        work = sum(c * (r["comp"] + c / 2) for r, c in sched if not r["dec"])
        dctx = sum(r["comp"] + 1 for r, _ in sched if r["dec"])
        now += lat.iteration_time(tokens, work, dctx, len(sched))
        steps += 1
        for r, c in sched:
            r["comp"] += c
            if r["comp"] == r["P"] + r["g"]:
                r["g"] += 1
                r["dec"] = True
                if r["g"] >= r["out"]:
                    assert r["rid"] not in finish
                    finish[r["rid"]] = now
                    free += r["held"]
                    running.remove(r)
                    for d, ups in list(blocked.items()):
                        ups.discard(r["rid"])
                        if not ups:
                            del blocked[d]
                            later.append((max(states[d]["arr"], now), states[d]["idx"], states[d]))
    assert not blocked, "a dependency cycle"
    return finish, steps, preemptions


def workload(seed: int, n: int, max_prompt: int = 300, max_out: int = 200):
    rng = np.random.default_rng(seed)
    return [SimRequest(i, int(rng.integers(1, max_prompt)), int(rng.integers(1, max_out)),
                       int(rng.integers(0, 3)) if rng.random() < 0.1 else 0) for i in range(n)]


def test_single_request_chunked_prefill_by_hand():
    lim = EngineLimits(4, 16, 128, 100)
    # prompt 20 with a 16-token budget: chunks 16, 4 (token 1 sampled), then two decodes
    res = simulate([SimRequest(7, 20, 3)], lim, UNIT, record=True)
    assert res.finish_times_s == {7: 4.0}
    assert [it.num_tokens for it in res.iterations] == [16, 4, 1, 1]
    assert [it.num_prefill for it in res.iterations] == [1, 1, 0, 0]
    tok = LatencyModel(0.0, 1.0, 0.0, 0.0, 0.0)
    assert simulate([SimRequest(7, 20, 3)], lim, tok).total_time_s == pytest.approx(22.0)


def test_max_num_seqs_serialises_by_hand():
    lim = EngineLimits(1, 64, 128, 100)
    res = simulate([SimRequest(0, 10, 3), SimRequest(1, 10, 2)], lim, UNIT)
    # request 1 is admitted in the iteration after request 0 finished (iteration 3)
    assert res.finish_times_s == {0: 3.0, 1: 5.0}


def test_preemption_recomputes_by_hand():
    # 3 blocks of 16: A and B (16-token prompts) are admitted together; at A's first decode it needs
    # a 2nd block, B (newest) needs one too and preempts itself; B (17 tokens = 2 blocks) only fits
    # again when A finished at iteration 20, then re-prefills 17 tokens and decodes to 20 tokens.
    lim = EngineLimits(2, 64, 128, 3)
    res = simulate([SimRequest(0, 16, 20), SimRequest(1, 16, 20)], lim, UNIT, record=True)
    assert res.finish_times_s == {0: 20.0, 1: 39.0}
    assert res.num_preemptions == 1
    assert res.iterations[1].num_preempted == 1
    assert res.iterations[20].num_tokens == 17 and res.iterations[20].num_prefill == 1
    assert all(it.free_blocks >= 0 for it in res.iterations)


def test_max_model_len_caps_output():
    lim = EngineLimits(4, 64, 32, 100)
    res = simulate([SimRequest(0, 30, 100)], lim, UNIT)
    assert res.finish_times_s == {0: 2.0}  # prefill, 1 decode: 30 + 2 tokens = max_model_len
    assert res.generated_tokens == 2


@pytest.mark.parametrize("seed,lim", [
    (1, EngineLimits(8, 64, 512, 200)),
    (2, EngineLimits(32, 256, 512, 40)),  # tight KV: frequent preemption
    (3, EngineLimits(16, 32, 512, 60, block_size=8)),
    (4, EngineLimits(64, 2048, 1024, 1000)),
])
def test_matches_literal_vllm_loop(seed, lim):
    reqs = workload(seed, 80)
    ref_finish, ref_steps, ref_pre = reference(reqs, lim, LAT)
    for jump in (False, True):
        res = simulate(reqs, lim, LAT, jump=jump)
        assert res.num_iterations == ref_steps
        assert res.num_preemptions == ref_pre
        assert res.finish_times_s.keys() == ref_finish.keys() == {r.rid for r in reqs}
        for rid, t in ref_finish.items():
            assert res.finish_times_s[rid] == pytest.approx(t, rel=1e-9)
        assert res.remaining == []
    if seed == 2:
        assert ref_pre > 0


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_invariants_and_jump_equals_step(seed):
    lim = EngineLimits(16, 128, 1024, 150)
    reqs = workload(seed, 120, max_prompt=200, max_out=400)
    a = simulate(reqs, lim, LAT, record=True, jump=True)
    b = simulate(reqs, lim, LAT, record=True, jump=False)
    assert a.num_iterations == b.num_iterations == len(a.iterations)
    for x, y in zip(a.iterations, b.iterations):
        assert (x.num_tokens, x.decode_ctx_sum, x.batch_size, x.free_blocks) == (
            y.num_tokens, y.decode_ctx_sum, y.batch_size, y.free_blocks)
        assert x.duration_s == pytest.approx(y.duration_s)
        assert x.num_tokens <= lim.max_num_batched_tokens and x.batch_size <= lim.max_num_seqs
        assert 0 <= x.free_blocks <= lim.num_kv_blocks
    for rid in a.finish_times_s:
        assert a.finish_times_s[rid] == pytest.approx(b.finish_times_s[rid])
    assert a.total_time_s == pytest.approx(sum(it.duration_s for it in a.iterations))
    expected = sum(max(1, min(r.output_len, lim.max_model_len - r.prompt_len)) - r.generated
                   for r in reqs)
    assert a.generated_tokens == b.generated_tokens == expected


def test_until_cutoff_is_a_prefix_of_the_full_run():
    lim = EngineLimits(16, 128, 1024, 150)
    reqs = workload(9, 100, max_prompt=200, max_out=300)
    full = simulate(reqs, lim, LAT, record=True)
    cut_at = full.total_time_s * 0.4
    for jump in (True, False):
        cut = simulate(reqs, lim, LAT, until_s=cut_at, jump=jump)
        done = {rid for rid, t in full.finish_times_s.items() if t <= cut_at}
        assert set(cut.finish_times_s) == done
        assert cut.num_iterations == sum(1 for it in full.iterations
                                         if it.start_s + it.duration_s <= cut_at * (1 + 1e-12))
        assert cut.total_time_s <= cut_at
        left = {r.rid: r for r in cut.remaining}
        assert set(left) == {r.rid for r in reqs} - done
        orig = {r.rid: r for r in reqs}
        assert all(orig[rid].generated <= r.generated < r.output_len for rid, r in left.items())
        assert cut.generated_tokens == sum(
            left[r.rid].generated - r.generated if r.rid in left else
            min(r.output_len, lim.max_model_len - r.prompt_len) - r.generated for r in reqs)
    # resuming re-prefills prompt + generated and finishes every remaining request exactly once
    rest = simulate(cut.remaining, lim, LAT)
    assert set(rest.finish_times_s) == set(left)


def test_request_that_can_never_fit_is_an_error():
    with pytest.raises(ValueError):
        simulate([SimRequest(0, 100, 4)], EngineLimits(4, 128, 512, 2), UNIT)
    with pytest.raises(ValueError):
        EngineLimits(64, 32, 512, 10)  # vLLM refuses max_num_batched_tokens < max_num_seqs


def test_kv_blocks_from_model_config():
    spec = ModelSpec("m", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8,
                     intermediate_size=14336, vocab_size=128256)
    # Llama-3-8B: 128 KiB per token in bf16 -> 8192 tokens (512 blocks) per GiB
    assert kv_blocks(spec, 1, 1 << 30) == 512
    assert kv_blocks(spec, 2, 1 << 30) == 1024  # half the KV heads per rank
    assert kv_blocks(spec, 16, 1 << 30) == 4096  # heads replicated past tp = kv heads: 1 per rank


def test_ten_thousand_requests_are_fast():
    rng = np.random.default_rng(0)
    reqs = [SimRequest(i, int(p), int(o)) for i, (p, o) in
            enumerate(zip(rng.integers(50, 1500, 10_000), rng.geometric(1 / 200, 10_000)))]
    lim = EngineLimits(256, 8192, 4096, 20_000)
    t = time.perf_counter()
    res = simulate(reqs, lim, LAT)
    elapsed = time.perf_counter() - t
    assert len(res.finish_times_s) == 10_000
    assert elapsed < 2.0, elapsed  # typically well under 0.1 s; generous for a loaded CI machine
