"""Prefix caching in the simulator (`EngineLimits.prefix_caching`, `SimRequest.prefix`): off or
without prefixes nothing changes; hand-computed hits (later admissions, the num_tokens − 1 cap, LRU
eviction, tail blocks evicted first); the fast paths (implicit decoders, jumps, the preemption pass)
against a literal transcription of the same cache model; the DP split's prefix affinity and
fingerprints that tell prefixes apart; the estimator passing the flag and not extrapolating."""

from __future__ import annotations

import dataclasses
from collections import Counter, OrderedDict, deque

import numpy as np
import pytest

from runtime.config import ModelConfig
from scheduler.dag import split_replicas
from scheduler.estimator import Estimator
from scheduler.latency import LatencyModel
from scheduler.runs import TimedRun, Workload
from scheduler.simulator import EngineLimits, simulate
from scheduler.types import ModelSpec, SimRequest
from tests.scheduler.test_simulator import LAT, cdiv

TOK = LatencyModel(0.0, 1.0, 0.0, 0.0, 0.0)  # 1 s per scheduled token: times count tokens


def _chain(tag: int, n: int) -> tuple[int, ...]:
    return tuple(tag * 1000 + k for k in range(n))


def reference(requests, lim: EngineLimits, lat: LatencyModel):
    """vLLM V1 FCFS scheduling with the simulator's prefix-cache model written out literally, one
    request at a time: running pass (allocate, evict, cache the chunk's full prefix blocks), then
    admissions (look up, touch the hits, allocate, evict, cache). Checks the cache's invariants
    every iteration. Returns (finish, steps, preemptions, queries, hits)."""
    bs, mml = lim.block_size, lim.max_model_len
    ref: dict[int, int] = {}
    lru: OrderedDict[int, None] = OrderedDict()
    finish, waiting, running = {}, deque(), []
    for r in requests:
        p = min(max(1, r.prompt_len), mml - 1)
        st = {"rid": r.rid, "P": p, "out": max(1, min(r.output_len, mml - p)), "g": r.generated,
              "comp": 0, "held": 0, "dec": False, "pf": r.prefix[:p // bs], "pins": 0,
              "resumed": False, "arr": r.arrival_s}
        if st["g"] >= st["out"]:
            finish[r.rid] = 0.0
        else:
            waiting.append(st)
    later = sorted([s for s in waiting if s["arr"] > 0], key=lambda s: s["arr"])
    waiting = deque(s for s in waiting if s["arr"] <= 0)

    def evict():
        while len(lru) > free:
            lru.popitem(last=False)

    def pin(st, upto):
        for h in st["pf"][st["pins"]:upto]:
            if not ref.get(h):
                lru.pop(h, None)
            ref[h] = ref.get(h, 0) + 1
        st["pins"] = max(st["pins"], min(upto, len(st["pf"])))

    def unpin(st):
        for h in reversed(st["pf"][:st["pins"]]):
            ref[h] -= 1
            if not ref[h]:
                del ref[h]
                lru[h] = None
        st["pins"] = 0

    free, now, steps, preemptions, queries, hits = lim.num_kv_blocks, 0.0, 0, 0, 0, 0
    while waiting or running or later:
        if not waiting and not running:
            now = max(now, later[0]["arr"])
        while later and later[0]["arr"] <= now:
            waiting.append(later.pop(0))
        budget, sched, preempted = lim.max_num_batched_tokens, [], []
        idx = 0
        while idx < len(running) and budget > 0:
            r = running[idx]
            c = min(r["P"] + r["g"] - r["comp"], budget)
            need = cdiv(r["comp"] + c, bs) - r["held"]
            while need > free:
                v = running.pop()
                free += v["held"]
                v.update(held=0, comp=0, dec=False, resumed=True)
                unpin(v)
                waiting.appendleft(v)
                preempted.append(v)
                if v is r:
                    break
            if preempted and preempted[-1] is r:
                break
            free -= need
            r["held"] += need
            evict()
            pin(r, (r["comp"] + c) // bs)
            budget -= c
            sched.append((r, c))
            idx += 1
        if not preempted:
            while waiting and budget > 0 and len(running) < lim.max_num_seqs:
                r = waiting[0]
                tokens = r["P"] + r["g"]
                k = 0
                while k < min(len(r["pf"]), (tokens - 1) // bs) and (
                        r["pf"][k] in ref or r["pf"][k] in lru):
                    k += 1
                c = min(tokens - k * bs, budget)
                if cdiv(k * bs + c, bs) > free:
                    break
                waiting.popleft()
                pin(r, k)
                free -= cdiv(k * bs + c, bs)
                r["held"] = cdiv(k * bs + c, bs)
                evict()
                pin(r, (k * bs + c) // bs)
                if not r["resumed"]:
                    queries += tokens
                    hits += k * bs
                r["comp"] = k * bs
                running.append(r)
                sched.append((r, c))
                budget -= c
        preemptions += len(preempted)
        assert sched, "no progress"
        assert free >= 0 and free + sum(r["held"] for r in running) == lim.num_kv_blocks
        assert len(lru) <= free and not set(lru) & set(ref)
        assert ref == Counter(h for r in running for h in r["pf"][:r["pins"]])
        tokens = sum(c for _, c in sched)
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
                    finish[r["rid"]] = now
                    free += r["held"]
                    running.remove(r)
                    unpin(r)
    return finish, steps, preemptions, queries, hits


def _shared_workload(seed: int, n: int, bs: int, arrivals: bool = False):
    """Random requests in groups sharing prefixes: a system prompt of a few blocks under most, then
    a per-group document; some prompts end inside or right at the end of their prefix."""
    rng = np.random.default_rng([seed, 5])
    system = _chain(1, int(rng.integers(1, 4)))
    reqs, rid = [], 0
    while rid < n:
        doc = _chain(10 + rid, int(rng.integers(0, 5)))
        pf = (system if rng.random() < 0.8 else ()) + doc
        pf = pf or _chain(5000 + rid, 1)
        for _ in range(int(rng.integers(1, 6))):
            blocks = len(pf) - int(rng.integers(0, 2))  # sometimes shorter than its prefix
            prompt = max(1, blocks * bs + int(rng.choice([0, 0, 1, bs - 1, 2 * bs])))
            reqs.append(SimRequest(rid, prompt, int(rng.integers(1, 60)),
                                   int(rng.integers(0, 3)) if rng.random() < 0.1 else 0,
                                   prefix=pf))
            rid += 1
    if arrivals:
        reqs = [dataclasses.replace(r, arrival_s=float(rng.uniform(0, 30)))
                if rng.random() < 0.5 else r for r in reqs]
    return reqs[:n]


def _limits(seed: int, caching: bool = True) -> EngineLimits:
    """Random small engines; odd seeds chunk prefills hard (budgets of a few blocks), so chunks
    fill prefix blocks in the running pass, also while it preempts."""
    rng = np.random.default_rng([seed, 9])
    bs = int(rng.choice([4, 8, 16]))
    fit = -(-200 // bs)  # the longest request fits alone
    seqs = int(rng.integers(1, 16))
    budget = int(rng.integers(max(16, seqs), 48) if seed % 2 else rng.integers(32, 200))
    return EngineLimits(seqs, budget, 512, int(rng.integers(fit, 3 * fit)), block_size=bs,
                        prefix_caching=caching)


def _same(a, b) -> None:
    assert a.finish_times_s == b.finish_times_s
    assert (a.total_time_s, a.num_iterations, a.num_preemptions, a.generated_tokens) == (
        b.total_time_s, b.num_iterations, b.num_preemptions, b.generated_tokens)
    assert a.iterations == b.iterations and a.kv_trace == b.kv_trace


@pytest.mark.parametrize("seed", range(6))
def test_off_or_without_prefixes_changes_nothing(seed):
    lim = _limits(seed, caching=False)
    reqs = _shared_workload(seed, 60, lim.block_size)
    bare = [dataclasses.replace(r, prefix=()) for r in reqs]
    kw = dict(record=True, kv_trace=True)
    base = simulate(bare, lim, LAT, **kw)
    _same(simulate(reqs, lim, LAT, **kw), base)  # caching off: prefixes ignored
    on = simulate(bare, dataclasses.replace(lim, prefix_caching=True), LAT, **kw)
    _same(on, base)  # caching on, nothing to share
    assert on.prefix_hit_tokens == 0 and on.prefix_queries_tokens > 0
    assert base.prefix_queries_tokens == base.prefix_hit_tokens == 0


def test_later_requests_hit_the_shared_prefix_by_hand():
    # one at a time (max_num_seqs = 1): 70-token prompts, 4 shared blocks (64 tokens); the first
    # computes all 70, each later one 6; every request then decodes 2 tokens
    pf = _chain(1, 4)
    reqs = [SimRequest(i, 70, 3, prefix=pf) for i in range(4)]
    lim = EngineLimits(1, 128, 512, 100, prefix_caching=True)
    res = simulate(reqs, lim, TOK, record=True)
    assert (res.prefix_hit_tokens, res.prefix_queries_tokens) == (3 * 64, 4 * 70)
    assert [it.num_tokens for it in res.iterations] == [70, 1, 1] + [6, 1, 1] * 3
    assert res.total_time_s == 72 + 3 * 8
    off = dataclasses.replace(lim, prefix_caching=False)
    assert simulate(reqs, off, TOK).total_time_s == 4 * 72


def test_requests_admitted_later_in_the_same_step_hit_already():
    """vLLM caches a full block when it allocates the chunk that fills it (`allocate_slots` caches
    up to computed + new tokens), so requests admitted after the first in the same step hit the
    blocks its chunk computes in that very step."""
    pf = _chain(1, 4)
    reqs = [SimRequest(i, 70, 3, prefix=pf) for i in range(4)]
    lim = EngineLimits(8, 512, 512, 100, prefix_caching=True)
    res = simulate(reqs, lim, TOK, record=True)
    assert res.iterations[0].num_tokens == 70 + 3 * 6 and res.iterations[0].num_prefill == 4
    assert res.prefix_hit_tokens == 3 * 64


def test_a_fully_cached_prompt_still_computes_its_last_block():
    # 64-token prompts, all 4 blocks shared: hits stop at (64 − 1) // 16 = 3 blocks
    pf = _chain(1, 4)
    reqs = [SimRequest(i, 64, 2, prefix=pf) for i in range(3)]
    res = simulate(reqs, EngineLimits(1, 128, 512, 100, prefix_caching=True), TOK, record=True)
    assert res.prefix_hit_tokens == 2 * 48
    assert [it.num_tokens for it in res.iterations] == [64, 1, 16, 1, 16, 1]


def test_lru_eviction_evicts_the_tails_first_by_hand():
    # 10 blocks; 70-token prompts (5 blocks) with 4-block prefixes, one token out (done at prefill).
    # A, B, C: after C is admitted (5 free, 8 evictable) the 3 oldest go: A's blocks 3, 2, 1
    # (freed in reverse order, tail first); A's block 0 stays. D (A's prefix) hits 1 block; its
    # admission evicts B's 3, 2, 1; E (B's prefix) hits 1; its admission evicts C's 3, 2, 1; F (C's
    # prefix) hits 1.
    a, b, c = _chain(1, 4), _chain(2, 4), _chain(3, 4)
    reqs = [SimRequest(i, 70, 1, prefix=pf) for i, pf in enumerate([a, b, c, a, b, c])]
    lim = EngineLimits(1, 128, 512, 10, prefix_caching=True)
    res = simulate(reqs, lim, TOK, record=True)
    assert res.prefix_hit_tokens == 3 * 16
    assert [it.num_tokens for it in res.iterations] == [70] * 3 + [54] * 3
    # room for every prefix: D, E and F hit all 4 blocks
    roomy = dataclasses.replace(lim, num_kv_blocks=20)
    assert simulate(reqs, roomy, TOK).prefix_hit_tokens == 3 * 64


def test_a_preempted_request_hits_its_own_blocks_when_readmitted():
    # A and B (96-token prompts, 6 shared blocks of their own) are admitted together into 13
    # blocks; at B's first block overflow B (newest) is preempted, its blocks evictable; A finishes
    # later and B re-admitted hits its own cached blocks (not counted: vLLM counts re-admissions
    # apart)
    reqs = [SimRequest(0, 96, 40, prefix=_chain(1, 6)), SimRequest(1, 96, 40, prefix=_chain(2, 6))]
    lim = EngineLimits(2, 256, 512, 13, prefix_caching=True)
    res = simulate(reqs, lim, TOK, record=True)
    assert res.num_preemptions >= 1
    assert (res.prefix_queries_tokens, res.prefix_hit_tokens) == (192, 0)
    readmit = [it for it in res.iterations[1:] if it.num_prefill]
    assert readmit and readmit[0].num_tokens < 96 + 1  # recomputes only past its cached blocks
    ref = reference(reqs, lim, TOK)
    assert res.finish_times_s == pytest.approx(ref[0])


@pytest.mark.parametrize("seed", range(60))
def test_fast_paths_match_the_literal_loop_and_jumps_equal_steps(seed):
    lim = _limits(seed)
    reqs = _shared_workload(seed, int(np.random.default_rng(seed).integers(5, 70)), lim.block_size,
                            arrivals=seed % 3 == 0)
    ref_finish, ref_steps, ref_pre, ref_q, ref_h = reference(reqs, lim, LAT)
    runs = [simulate(reqs, lim, LAT, jump=jump, record=True) for jump in (False, True)]
    for res in runs:
        assert (res.num_iterations, res.num_preemptions) == (ref_steps, ref_pre)
        assert (res.prefix_queries_tokens, res.prefix_hit_tokens) == (ref_q, ref_h)
        assert res.finish_times_s.keys() == ref_finish.keys()
        for rid, t in ref_finish.items():
            assert res.finish_times_s[rid] == pytest.approx(t, rel=1e-9)
    step, jump = runs
    assert [(it.num_tokens, it.free_blocks, it.num_prefill) for it in step.iterations] == [
        (it.num_tokens, it.free_blocks, it.num_prefill) for it in jump.iterations]


def test_random_workloads_hit_and_preempt():
    """The random cases above exercise what they claim: hits, preemptions and evictions."""
    hits = pre = 0
    for seed in range(40):
        lim = _limits(seed)
        res = simulate(_shared_workload(seed, 60, lim.block_size), lim, LAT)
        hits += res.prefix_hit_tokens > 0
        pre += res.num_preemptions > 0
    assert hits >= 30 and pre >= 10


def test_a_cut_keeps_the_prefixes():
    lim = _limits(3)
    reqs = _shared_workload(3, 40, lim.block_size)
    full = simulate(reqs, lim, LAT)
    for jump in (True, False):
        cut = simulate(reqs, lim, LAT, until_s=full.total_time_s / 2, jump=jump)
        orig = {r.rid: r for r in reqs}
        assert cut.remaining and all(r.prefix is orig[r.rid].prefix for r in cut.remaining)


def test_dp_split_keeps_prefix_groups_together():
    plain = [SimRequest(i, 10, 5) for i in range(7)]
    assert [list(idx) for _, idx in split_replicas(plain, 3, None)] == [[0, 3, 6], [1, 4], [2, 5]]
    pf = [_chain(1, 2)] * 4 + [()] + [_chain(2, 1)] * 2
    reqs = [dataclasses.replace(r, prefix=p) for r, p in zip(plain, pf)]
    parts = split_replicas(reqs, 3, None)
    assert [list(idx) for _, idx in parts] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [[r.rid for r in p] for p, _ in parts] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [[r.rid for r in p] for p in Workload.of(reqs).split(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [[r.rid for r in p] for p in Workload.of(plain).split(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(p) for p, _ in split_replicas(reqs[:2], 3, None)] == [1, 1, 0]
    # with same-model dependencies the linked groups decide, prefixes or not
    deps = {1: [0]}
    assert [list(i) for _, i in split_replicas(reqs, 3, deps)] == [
        list(i) for _, i in split_replicas(plain, 3, deps)]


def test_fingerprints_tell_prefixes_apart():
    reqs = [SimRequest(i, 40, 5, prefix=_chain(1, 2)) for i in range(4)]
    other = [dataclasses.replace(r, prefix=_chain(2, 2)) for r in reqs]
    bare = [dataclasses.replace(r, prefix=()) for r in reqs]
    copies = [dataclasses.replace(r, prefix=tuple(list(r.prefix))) for r in reqs]  # equal, not same
    for fp in (lambda rs: Workload.of(rs).fingerprint, TimedRun.fingerprint):
        assert len({fp(reqs), fp(other), fp(bare)}) == 3
        assert fp(copies) == fp(reqs)
    # which request has which prefix matters too
    swapped = [dataclasses.replace(r, prefix=p) for r, p in
               zip(reqs, [_chain(1, 2), _chain(2, 2), _chain(1, 2), _chain(2, 2)])]
    swapped2 = [dataclasses.replace(r, prefix=p) for r, p in
                zip(reqs, [_chain(2, 2), _chain(1, 2), _chain(1, 2), _chain(2, 2)])]
    assert Workload.of(swapped).fingerprint != Workload.of(swapped2).fingerprint


def test_for_spec_and_estimator_pass_the_flag():
    spec = ModelSpec("m", 2, 64, 4, 2, 256, 512, dtype_bytes=4, max_model_len=512,
                     max_num_seqs=8, max_num_batched_tokens=256)
    assert not EngineLimits.for_spec(spec, 100).prefix_caching
    assert EngineLimits.for_spec(spec, 100, prefix_caching=True).prefix_caching
    lat = lambda s, tp: LAT  # noqa: E731
    kv = lambda s, tp: 1 << 22  # noqa: E731
    on = Estimator({"m": dataclasses.replace(spec, prefix_caching=True)}, lat, kv)
    assert on.limits("m", 1).prefix_caching and on.exact().limits("m", 1).prefix_caching
    assert not Estimator({"m": spec}, lat, kv).limits("m", 1).prefix_caching
    # the estimator's runs see the hits: the shared-prefix workload runs faster with caching
    reqs = [SimRequest(i, 300, 4, prefix=_chain(1, 16)) for i in range(40)]
    w = Workload.of(reqs)
    off_run = Estimator({"m": spec}, lat, kv).run("m", 1, 2, w)
    on_run = on.run("m", 1, 2, w)
    assert on_run.total_s < off_run.total_s


def test_large_workloads_with_prefixes_are_simulated_not_extrapolated():
    spec = ModelSpec("m", 2, 64, 4, 2, 256, 512, dtype_bytes=4, max_model_len=512,
                     max_num_seqs=8, max_num_batched_tokens=256)
    lat, kv = (lambda s, tp: LAT), (lambda s, tp: 1 << 22)
    rng = np.random.default_rng(0)
    reqs = [SimRequest(i, int(rng.integers(40, 200)), int(rng.integers(1, 40)),
                       prefix=_chain(1 + i // 10, 2)) for i in range(60)]
    w = Workload.of(reqs)
    for caching, extrapolated in ((True, False), (False, True)):
        est = Estimator({"m": dataclasses.replace(spec, prefix_caching=caching)}, lat, kv,
                        exact_limit=20, line_sample=16)
        run = est.run("m", 1, 2, w)
        assert (run.order is None) == extrapolated  # extrapolated runs have no request order
        if not extrapolated:  # exact: the replicas' own simulations
            lim = est.limits("m", 1)
            want = max(simulate(p, lim, LAT).total_time_s for p in w.split(2))
            assert run.total_s == pytest.approx(want)
            left = est.advance("m", 1, 2, w, run.total_s / 2).requests
            cut = [r for p in w.split(2)
                   for r in simulate(p, lim, LAT, until_s=run.total_s / 2).remaining]
            assert sorted((r.rid, r.generated) for r in left) == sorted(
                (r.rid, r.generated) for r in cut)


def test_larger_engine_blocks_use_every_kth_hash_of_the_16_token_chain():
    """vLLM's CPU backend caches 128-token blocks: a prefix of 16-token hashes hits in whole
    large blocks only (hash 8j+7 names large block j), so 600 shared tokens hit 512, not 592."""
    shared = _chain(1, 37)  # 592 tokens in 16-token blocks
    reqs = [SimRequest(i, 640, 2, prefix=shared + (9000 + i,)) for i in range(3)]
    fine = simulate(reqs, EngineLimits(1, 1024, 1024, 100, 16, prefix_caching=True), TOK)
    coarse = simulate(reqs, EngineLimits(1, 1024, 1024, 20, 128, prefix_caching=True), TOK)
    assert fine.prefix_hit_tokens == 2 * 592
    assert coarse.prefix_hit_tokens == 2 * 512
    spec = ModelSpec("m", 2, 64, 4, 2, 256, 512, block_size=128)
    assert EngineLimits.for_spec(spec, 10).block_size == 128


def test_the_engine_block_size_follows_the_device_kind_and_engine_args():
    m = ModelConfig(name="m", path="x")
    assert m.kv_block_size("cpu") == 128 and m.kv_block_size("cuda") == 16
    assert ModelConfig(name="m", path="x", engine_args={"block_size": 32}).kv_block_size("cpu") == 32
