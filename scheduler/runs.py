"""Workloads and engine runs as the estimator (`scheduler.estimator`) hands them to the planner.

A `Workload` is a model's remaining requests: a *root* one holds them; a *derived* one is a position
on a run of a root workload (what is left after part of a stage), whose requests are built only when
asked for. A `PlanRun` is one (model, tp, dp) run: its length, the finish curve of its requests and
the useful work done by each point in time, which the search reads instead of re-simulating.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from operator import attrgetter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from scheduler.dag import split_replicas
from scheduler.types import ModelSpec, SimRequest


_RID = attrgetter("rid")


def _rid(r: SimRequest) -> int:
    return r.rid


@dataclass(frozen=True)
class Position:
    """Where a derived workload stands: what is left of `root` after its run on shape (tp, dp) reached
    `t_s` seconds (engine ready) with `work_s` useful FLOPs done. Positions always refer to runs of
    the root workload, so estimates never compound across stages."""

    root: "Workload"
    tp: int
    dp: int
    t_s: float
    frac: float  # fraction of the root's requests finished by t_s on that run


@dataclass(frozen=True)
class Workload:
    """A model's remaining requests (sorted by rid, never mutated) and a fingerprint of them.

    A *derived* workload (`pos` set, made by `Estimator.advance`) is what is left of a root workload
    after part of a run; its runs are read off the root's runs (`Estimator.run`), and its requests
    are only built when someone asks for them (`requests`)."""

    _requests: tuple[SimRequest, ...] | None
    fingerprint: str
    tokens: np.ndarray | None  # per request: (rid, prompt_len, output_len, generated); root only
    pos: Position | None = None
    _left: Callable[[], tuple[SimRequest, ...]] | None = field(default=None, compare=False)
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def of(requests: Sequence[SimRequest]) -> "Workload":
        # no copies: nothing in the planner or the simulator mutates a SimRequest, and copying
        # 10,000s of them per stage dominated planning time
        reqs = tuple(sorted([r for r in requests if r.output_len > r.generated], key=_RID))
        cols = [[r.rid for r in reqs], [r.prompt_len for r in reqs], [r.output_len for r in reqs],
                [r.generated for r in reqs]]
        arr = np.ascontiguousarray(np.array(cols, dtype=np.int64).T).reshape(-1, 4)
        digest = hashlib.blake2b(arr.tobytes(), digest_size=16)
        if any(r.arrival_s or r.upstream for r in reqs):
            digest.update(_timing(reqs))  # runs honour them: keep such workloads apart
        if any(r.prefix for r in reqs):
            digest.update(_prefixes(reqs))  # prefix caching and the DP split read them
        return Workload(reqs, digest.hexdigest(), arr)

    @property
    def requests(self) -> tuple[SimRequest, ...]:
        if self._requests is not None:
            return self._requests
        if "r" not in self._cache:
            self._cache["r"] = self._left()
        return self._cache["r"]

    def __len__(self) -> int:
        return len(self.requests)

    def split(self, dp: int) -> list[list[SimRequest]]:
        """Per DP replica, as the estimator simulates them (`scheduler.dag.split_replicas`):
        round-robin in rid order (replica r gets requests r, r+dp, r+2dp, ...), or, when some
        request has a prefix, dp contiguous runs of the rid order (prefix affinity)."""
        return [list(part) for part, _ in split_replicas(self.requests, dp, None)]


@dataclass
class PlanRun:
    """One (model, tp, dp) run to completion on a workload, without load time."""

    total_s: float  # slowest replica
    finish_sorted: np.ndarray  # finish time of every request, ascending
    work_cum: np.ndarray  # useful FLOPs finished by finish_sorted[i] (inclusive), cumulative
    # request index (into the workload's requests) of each finish_sorted entry; None when the run
    # is extrapolated from a subsample
    order: np.ndarray | None = None
    # per replica: (event times, KV tokens in use, requests running) from the simulator's trace
    kv: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None

    def in_flight(self, elapsed_s: float) -> tuple[float, int]:
        """KV tokens held and requests running, summed over replicas, `elapsed_s` into the run."""
        tokens, n = 0.0, 0
        for times, used, running in self.kv or ():
            i = int(np.searchsorted(times, elapsed_s, side="right")) - 1
            if i >= 0:
                tokens += float(used[i])
                n += int(running[i])
        return tokens, n

    # Python lists of finish_sorted and work_cum: the search asks for single points thousands of
    # times, where bisect on a list is several times cheaper than numpy on a scalar
    _lists: tuple[list[float], list[float]] | None = field(default=None, repr=False, compare=False)

    def _as_lists(self) -> tuple[list[float], list[float]]:
        if self._lists is None:
            self._lists = (self.finish_sorted.tolist(), self.work_cum.tolist())
        return self._lists

    @property
    def total_work(self) -> float:
        cum = self._as_lists()[1]
        return cum[-1] if cum else 0.0

    def requests_done(self, elapsed_s: float) -> float:
        """Useful FLOPs of the requests finished within `elapsed_s` of the engine being ready."""
        fin, cum = self._as_lists()
        if elapsed_s <= 0 or not fin:
            return 0.0
        i = bisect_right(fin, elapsed_s * (1 + 1e-12))
        return cum[i - 1] if i else 0.0

    def work_done(self, elapsed_s: float) -> float:
        """Useful FLOPs of the *tokens* produced within `elapsed_s` of the engine being ready (the
        paper counts completed tokens, not only completed requests). Tokens of requests still in
        flight are not in the finish times, so the run's average rate stands in for them; requests
        already finished are a lower bound."""
        if elapsed_s <= 0 or self.total_s <= 0:
            return 0.0 if elapsed_s <= 0 else self.total_work
        linear = self.total_work * min(1.0, elapsed_s / self.total_s)
        return max(linear, self.requests_done(elapsed_s))


    def time_to(self, work: float) -> float:
        """The earliest elapsed time at which `work_done` reaches `work` (inverse of work_done)."""
        total = self.total_work
        if work <= 0 or total <= 0:
            return 0.0
        if work >= total:
            return self.total_s
        i = int(np.searchsorted(self.work_cum, work * (1 - 1e-12), side="left"))
        step = float(self.finish_sorted[i]) if i < len(self.finish_sorted) else self.total_s
        return min(self.total_s * work / total, step)

    def done_fraction(self, elapsed_s: float) -> float:
        """Fraction of the requests finished within `elapsed_s`."""
        n = len(self.finish_sorted)
        if n == 0:
            return 1.0
        return int(np.searchsorted(self.finish_sorted, elapsed_s * (1 + 1e-12), side="right")) / n

    def time_of_fraction(self, q: float) -> float:
        """When the fraction `q` of the requests had finished (0 for q = 0)."""
        n = len(self.finish_sorted)
        k = int(round(q * n))
        return float(self.finish_sorted[min(k, n) - 1]) if k > 0 and n else 0.0

    def suffix(self, t_s: float) -> "PlanRun":
        """The rest of this run after `t_s` seconds, as a run of its own (times from t_s on)."""
        if t_s <= 0:
            return self
        i = int(np.searchsorted(self.finish_sorted, t_s * (1 + 1e-12), side="right"))
        base = float(self.work_cum[i - 1]) if i else 0.0
        return PlanRun(max(0.0, self.total_s - t_s), self.finish_sorted[i:] - t_s,
                       self.work_cum[i:] - base)


@dataclass(frozen=True)
class TimedRun:
    """One (model, tp, dp) run of requests with arrival times (`Estimator.timed_run`), in engine
    time (0 = the engine is ready). Dependent work is simulated rather than read off a cached run:
    when a request may start depends on other engines."""

    # per replica: its requests (arrival_s in engine time) and which of them wait for which
    parts: tuple[tuple[tuple[SimRequest, ...], dict[int, list[int]] | None], ...]
    finish: dict[int, float]  # rid -> when its last token was sampled
    admitted: dict[int, float]  # rid -> start of the first iteration that scheduled it
    total_s: float  # slowest replica (0 without requests)
    key: tuple  # the cache key (model, tp, dp, `fingerprint` of the requests)

    @staticmethod
    def fingerprint(requests: Sequence[SimRequest]) -> str:
        """Of the requests' (rid, prompt_len, output_len, generated), arrivals, upstream ids and
        prefixes."""
        cols = np.array([[r.rid, r.prompt_len, r.output_len, r.generated] for r in requests],
                        dtype=np.int64).reshape(-1, 4)
        digest = hashlib.blake2b(cols.tobytes() + _timing(requests), digest_size=16)
        if any(r.prefix for r in requests):
            digest.update(_prefixes(requests))
        return digest.hexdigest()


def _timing(requests: Sequence[SimRequest]) -> bytes:
    """The requests' arrival times and upstream ids, as bytes to hash."""
    return np.array([r.arrival_s for r in requests], dtype=float).tobytes() + repr(
        [r.upstream for r in requests]).encode()


def _prefixes(requests: Sequence[SimRequest]) -> bytes:
    """The requests' prefixes, as bytes to hash: each distinct prefix once (a prefix shared by
    50,000 requests is written once), then which one each request has."""
    index: dict[tuple[int, ...], int] = {}
    seen: dict[int, int] = {}  # id -> index: equal prefixes are mostly one object, hashed once
    which = []
    for r in requests:
        j = seen.get(id(r.prefix))
        if j is None:
            j = seen[id(r.prefix)] = index.setdefault(r.prefix, len(index))
        which.append(j)
    return repr(list(index)).encode() + np.array(which, dtype=np.int64).tobytes()


def useful_flops(spec: ModelSpec, r: SimRequest) -> float:
    return spec.flops_per_token * (r.remaining + (r.prompt_len if r.generated == 0 else 0))
