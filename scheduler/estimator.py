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
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from scheduler.latency import LatencyModel
from scheduler.simulator import EngineLimits, kv_blocks, simulate
from scheduler.types import BLOCK_SIZE, ModelSpec, SimRequest


@dataclass(frozen=True)
class Workload:
    """A model's remaining requests (sorted by rid, never mutated) and a fingerprint of them."""

    requests: tuple[SimRequest, ...]
    fingerprint: str

    @staticmethod
    def of(requests: Sequence[SimRequest]) -> "Workload":
        reqs = tuple(sorted((replace(r) for r in requests if r.remaining > 0), key=lambda r: r.rid))
        arr = np.array([(r.rid, r.prompt_len, r.output_len, r.generated) for r in reqs],
                       dtype=np.int64).reshape(-1, 4)
        return Workload(reqs, hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest())

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
        left: list[SimRequest] = []
        for part in work.split(dp):
            if not part:
                continue
            res = simulate(part, lim, lat, until_s=elapsed_s)
            self.simulations += 1
            left.extend(res.remaining)
        out = Workload.of(left)
        self._advanced[key] = out
        return out
