"""Cached engine-run estimates for the planner: "model M on TP×DP finishes this work in T seconds".

Every strategy asks the same questions many times (the same model, plan shape and remaining work
recur across candidate groups, stages and explored schedules), so `Estimator` answers them from the
simulator (`scheduler.simulator.simulate`) once and caches by (model, tp, dp, work fingerprint).

DP replicas get the model's requests round-robin in request-id order (as the paper's runtime and ours
split them); a model finishes when its slowest replica does. Load time is *not* included here: the
stage logic adds it, because it depends on whether the engine is kept or (re)started.

Useful work of a request (what stage throughput counts) = FLOPs of the tokens it still has to produce
plus its original prompt; re-prefilling prompt + generated tokens after a restart is waste, not work.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from scheduler.latency import LatencyModel
from scheduler.simulator import EngineLimits, kv_blocks, simulate
from scheduler.types import BLOCK_SIZE, ModelSpec, SimRequest


def _rid(r: SimRequest) -> int:
    return r.rid


@dataclass(frozen=True)
class Workload:
    """A model's remaining requests (sorted by rid, never mutated) and a fingerprint of them."""

    requests: tuple[SimRequest, ...]
    fingerprint: str
    tokens: np.ndarray  # per request: (rid, prompt_len, output_len, generated)

    @staticmethod
    def of(requests: Sequence[SimRequest]) -> "Workload":
        # no copies: nothing in the planner or the simulator mutates a SimRequest, and copying
        # 10,000s of them per stage dominated planning time
        reqs = tuple(sorted((r for r in requests if r.output_len > r.generated), key=_rid))
        arr = np.fromiter((x for r in reqs for x in (r.rid, r.prompt_len, r.output_len, r.generated)),
                          dtype=np.int64, count=4 * len(reqs))
        return Workload(reqs, hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest(),
                        arr.reshape(-1, 4))

    def __len__(self) -> int:
        return len(self.requests)

    def split(self, dp: int) -> list[list[SimRequest]]:
        """Round-robin in rid order: replica r gets requests r, r+dp, r+2dp, ..."""
        return [list(self.requests[r::dp]) for r in range(dp)]


@dataclass
class PlanRun:
    """One (model, tp, dp) run to completion on a workload, without load time."""

    total_s: float  # slowest replica
    finish_sorted: np.ndarray  # finish time of every request, ascending
    work_cum: np.ndarray  # useful FLOPs finished by finish_sorted[i] (inclusive), cumulative

    @property
    def total_work(self) -> float:
        return float(self.work_cum[-1]) if len(self.work_cum) else 0.0

    def requests_done(self, elapsed_s: float) -> float:
        """Useful FLOPs of the requests finished within `elapsed_s` of the engine being ready."""
        if elapsed_s <= 0 or len(self.finish_sorted) == 0:
            return 0.0
        i = int(np.searchsorted(self.finish_sorted, elapsed_s * (1 + 1e-12), side="right"))
        return float(self.work_cum[i - 1]) if i else 0.0

    def work_done(self, elapsed_s: float) -> float:
        """Useful FLOPs of the *tokens* produced within `elapsed_s` of the engine being ready (the
        paper counts completed tokens, not only completed requests). Tokens of requests still in
        flight are not in the finish times, so the run's average rate stands in for them; requests
        already finished are a lower bound."""
        if elapsed_s <= 0 or self.total_s <= 0:
            return 0.0 if elapsed_s <= 0 else self.total_work
        linear = self.total_work * min(1.0, elapsed_s / self.total_s)
        return max(linear, self.requests_done(elapsed_s))


def useful_flops(spec: ModelSpec, r: SimRequest) -> float:
    return spec.flops_per_token * (r.remaining + (r.prompt_len if r.generated == 0 else 0))


@dataclass
class Estimator:
    """Simulation front-end with caches. `latency(spec, tp)` and `kv_bytes_per_rank(spec, tp)` come
    from the planning problem; results are deterministic, so caching never changes an answer."""

    models: dict[str, ModelSpec]
    latency_fn: Callable[[ModelSpec, int], LatencyModel]
    kv_bytes_fn: Callable[[ModelSpec, int], int]
    _lat: dict[tuple[str, int], LatencyModel] = field(default_factory=dict)
    _limits: dict[tuple[str, int], EngineLimits] = field(default_factory=dict)
    _runs: dict[tuple[str, int, int, str], PlanRun] = field(default_factory=dict)
    _advanced: dict[tuple[str, int, int, str, float], Workload] = field(default_factory=dict)
    _lines: dict[tuple[str, int], tuple[float, float, PlanRun]] = field(default_factory=dict)
    _work_total: dict[tuple[str, str], float] = field(default_factory=dict)
    # models with more remaining requests than this are not simulated request by request (`_line`)
    exact_limit: int = 1024
    line_sample: int = 512  # requests in the larger of the two subsamples a line is fitted on
    simulations: int = 0  # simulate() calls made (for benchmarks and tests of the cache)

    def latency(self, model: str, tp: int) -> LatencyModel:
        key = (model, tp)
        if key not in self._lat:
            self._lat[key] = self.latency_fn(self.models[model], tp)
        return self._lat[key]

    def load_time(self, model: str, tp: int) -> float:
        return self.latency(model, tp).load_time_s

    def kv_bytes(self, model: str, tp: int) -> int:
        return int(self.kv_bytes_fn(self.models[model], tp))

    def fits(self, model: str, tp: int) -> bool:
        """vLLM refuses to start an engine whose KV cache cannot hold one max-length sequence."""
        spec = self.models[model]
        need_blocks = -(-spec.max_model_len // BLOCK_SIZE)
        kvb = self.kv_bytes(model, tp)
        return kvb > 0 and kv_blocks(spec, tp, kvb) >= need_blocks

    def limits(self, model: str, tp: int) -> EngineLimits:
        key = (model, tp)
        if key not in self._limits:
            spec = self.models[model]
            self._limits[key] = EngineLimits(
                max_num_seqs=spec.max_num_seqs,
                max_num_batched_tokens=spec.max_num_batched_tokens,
                max_model_len=spec.max_model_len,
                num_kv_blocks=kv_blocks(spec, tp, self.kv_bytes(model, tp)),
                block_size=BLOCK_SIZE,
            )
        return self._limits[key]

    def run(self, model: str, tp: int, dp: int, work: Workload) -> PlanRun:
        """Simulate every replica to completion (cached)."""
        key = (model, tp, dp, work.fingerprint)
        hit = self._runs.get(key)
        if hit is not None:
            return hit
        if len(work) > self.exact_limit:
            run = self._extrapolated(model, tp, dp, work)
            self._runs[key] = run
            return run
        spec, lat, lim = self.models[model], self.latency(model, tp), self.limits(model, tp)
        finish: list[float] = []
        work_of: list[float] = []
        total = 0.0
        for part in work.split(dp):
            if not part:
                continue
            by_rid = {r.rid: useful_flops(spec, r) for r in part}
            res = simulate(part, lim, lat)  # simulate never mutates its input
            self.simulations += 1
            total = max(total, res.total_time_s)
            for rid, t in res.finish_times_s.items():
                finish.append(t)
                work_of.append(by_rid.get(rid, 0.0))
        order = np.argsort(np.asarray(finish, dtype=float), kind="stable")
        run = PlanRun(total, np.asarray(finish, dtype=float)[order],
                      np.cumsum(np.asarray(work_of, dtype=float)[order]))
        self._runs[key] = run
        return run

    def advance(self, model: str, tp: int, dp: int, work: Workload, elapsed_s: float) -> Workload:
        """The work left after running `elapsed_s` seconds (engine ready) on this plan; requests in
        flight keep their generated tokens (a later engine re-prefills them)."""
        if elapsed_s <= 0:
            return work
        key = (model, tp, dp, work.fingerprint, round(elapsed_s, 9))
        hit = self._advanced.get(key)
        if hit is not None:
            return hit
        lat, lim = self.latency(model, tp), self.limits(model, tp)
        big = len(work) > self.exact_limit
        left: list[SimRequest] = []
        for part in work.split(dp):
            if not part:
                continue
            if big:
                # FCFS serves a large replica's queue in order at the fitted steady rate: the first
                # n_done requests are done; the ones in flight are kept as they were
                a, b, _ = self._line(model, tp, work)
                n_done = int(np.clip((elapsed_s - a) / b, 0, len(part))) if b > 0 else len(part)
                left.extend(part[n_done:])
                continue
            res = simulate(part, lim, lat, until_s=elapsed_s)
            self.simulations += 1
            left.extend(res.remaining)
        out = Workload.of(left)
        self._advanced[key] = out
        return out

    def _line(self, model: str, tp: int, work: Workload) -> tuple[float, float, PlanRun]:
        """Engine time of n requests drawn like `work`'s, T(n) = a + b·n, from two exact simulations
        of evenly spaced subsamples (exact_limit and exact_limit/2 requests), plus the larger run.

        Why: past a few max_num_seqs batches an FCFS engine is in steady state, so its time grows
        linearly in the number of requests (b = steady time per request; a = ramp-up and drain);
        simulating 10,000-request replicas request by request for every candidate plan would cost
        seconds per stage. Models with ≤ exact_limit requests left (what the CPU runtime usually
        sees) are simulated exactly, replica by replica.

        The line is fitted once per (model, tp), on the first large workload asked about: what is
        left after a stage is drawn from the same length distribution, so its per-request time is
        the same; re-fitting at every stage would cost two simulations per plan per stage."""
        key = (model, tp)
        hit = self._lines.get(key)
        if hit is not None:
            return hit
        spec, lat, lim = self.models[model], self.latency(model, tp), self.limits(model, tp)
        n, m2 = len(work), min(len(work), self.line_sample)
        idx = (np.arange(m2) * n) // m2
        sub2 = [work.requests[i] for i in idx]
        sub1 = sub2[::2]
        r2 = simulate(sub2, lim, lat)
        r1 = simulate(sub1, lim, lat)
        self.simulations += 2
        m1 = len(sub1)
        b = (r2.total_time_s - r1.total_time_s) / (m2 - m1) if m2 > m1 else 0.0
        if b <= 0:
            b = r2.total_time_s / m2
        a = r2.total_time_s - b * m2
        by_rid = {r.rid: useful_flops(spec, r) for r in sub2}
        fin = np.array(sorted(r2.finish_times_s.values()), dtype=float)
        order = sorted(r2.finish_times_s, key=lambda rid: r2.finish_times_s[rid])
        cum = np.cumsum([by_rid[rid] for rid in order])
        out = (a, b, PlanRun(r2.total_time_s, fin, cum))
        self._lines[key] = out
        return out

    def _extrapolated(self, model: str, tp: int, dp: int, work: Workload) -> PlanRun:
        """A dp-replica run of a large workload: every replica is a round-robin share of it, so
        its time is T(ceil(n/dp)) on the fitted line; the finish curve is the subsample's, stretched
        to that time and scaled to the workload's total useful FLOPs."""
        a, b, sample = self._line(model, tp, work)
        total = a + b * -(-len(work) // dp)
        work_total = self.work_total(model, work)
        scale_t = total / sample.total_s if sample.total_s > 0 else 1.0
        scale_w = work_total / sample.total_work if sample.total_work > 0 else 1.0
        return PlanRun(total, sample.finish_sorted * scale_t, sample.work_cum * scale_w)

    def work_total(self, model: str, work: Workload) -> float:
        key = (model, work.fingerprint)
        if key not in self._work_total:
            t = work.tokens  # vectorised useful_flops over the workload
            tokens = (t[:, 2] - t[:, 3]).clip(0) + np.where(t[:, 3] == 0, t[:, 1], 0)
            self._work_total[key] = self.models[model].flops_per_token * float(tokens.sum())
        return self._work_total[key]
