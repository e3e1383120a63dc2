"""Cached engine-run estimates for the planner: "model M on TP×DP finishes this work in T seconds".

Every strategy asks the same questions many times (the same model, plan shape and remaining work
recur across candidate groups, stages and explored schedules), so `Estimator` answers them from the
simulator (`scheduler.simulator.simulate`) once and caches by (model, tp, dp, work fingerprint).

DP replicas get the model's requests round-robin in request-id order (as the paper's runtime and ours
split them), or, when requests carry prefixes (`SimRequest.prefix`), in dp contiguous runs of that
order (prefix affinity: the runtime orders its queue by prefix and its replicas take from its ends,
so a prefix's requests share one replica's cache; `scheduler.dag.split_replicas`); a model finishes
when its slowest replica does. Load time is *not* included here: the stage logic adds it, because
it depends on whether the engine is kept or (re)started.

Stages do not re-simulate. What is left of a model after a stage is a derived workload (a position
on the run that produced it, `scheduler.runs`): an engine kept for the next stage continues that run
exactly (a stage cut is a prefix of the run to completion); an engine (re)started on it is, for
ranking candidates, read off the root's run on its shape plus a re-prefill delay (`_restart_run`,
no simulation), and simulated on the requests left in the `exact()` view, which the planner uses to
re-run every schedule it returns. Per workload, each (model, tp, dp) is thus simulated once.

CPU ranks on several cores (threads > 1) are *variants* of a model (`variant`): the same spec and
workloads under another name, whose latency is `threads_fn(spec, tp, threads)` (a measured profile)
or, without one, the threads = 1 model with the assumed speed-up of
`scheduler.latency.assumed_threads_latency`. Every cache then keeps them apart by name.

Useful work of a request (what stage throughput counts) = FLOPs of the tokens it still has to produce
plus its original prompt; re-prefilling prompt + generated tokens after a restart is waste, not work.

Dependent requests (`scheduler.dag`): requests that wait for requests of the same model (`chains`)
are simulated together, released as those finish, and kept on one DP replica
(`scheduler.dag.replica_parts`); such workloads are never extrapolated. Runs with arrival times
(`timed_run`: downstream requests released by other engines) are simulated, not read off a run,
and cached by their requests and arrival times.

Prefix caching (`ModelSpec.prefix_caching`, set from the engines' configuration): every simulation
of such a model replays vLLM's prefix cache over the requests' prefixes; its workloads, when some
request has a prefix, are never extrapolated either (`scheduler.extrapolation`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from scheduler.dag import same_model_deps, split_replicas
from scheduler.extrapolation import extrapolated_run, extrapolates, fitted_line
from scheduler.latency import LatencyModel, assumed_threads_latency
from scheduler.simulator import EngineLimits, kv_blocks, simulate
from scheduler.runs import PlanRun, Position, TimedRun, Workload, _rid, useful_flops
from scheduler.types import ModelSpec, SimRequest

__all__ = ["Estimator", "PlanRun", "Position", "Workload", "useful_flops"]


@dataclass
class Estimator:
    """Simulation front-end with caches. `latency(spec, tp)` and `kv_bytes_per_rank(spec, tp)` come
    from the planning problem; results are deterministic, so caching never changes an answer."""

    models: dict[str, ModelSpec]
    latency_fn: Callable[[ModelSpec, int], LatencyModel]
    kv_bytes_fn: Callable[[ModelSpec, int], int]
    # (spec, tp, threads) -> latency of ranks on `threads` cores; None: assumed from threads = 1
    threads_fn: Callable[[ModelSpec, int, int], LatencyModel] | None = None
    _variants: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (model, threads)
    _lat: dict[tuple[str, int], LatencyModel] = field(default_factory=dict)
    _limits: dict[tuple[str, int], EngineLimits] = field(default_factory=dict)
    _runs: dict[tuple[str, int, int, str], PlanRun] = field(default_factory=dict)
    _advanced: dict[tuple, Workload] = field(default_factory=dict)
    _lines: dict[tuple[str, int], tuple[float, float, PlanRun]] = field(default_factory=dict)
    _work_total: dict[tuple[str, str], float] = field(default_factory=dict)
    # models with more remaining requests than this are not simulated request by request (`scheduler.extrapolation.fitted_line`)
    exact_limit: int = 1024
    line_sample: int = 512  # requests in the larger of the two subsamples a line is fitted on
    # cold engines on derived workloads: read off root runs (True) or simulated on the requests
    # left (False, exact); see `_derived_run`
    approx_restarts: bool = True
    # some requests wait for requests of their own model (`scheduler.dag`; set by the planner)
    chains: bool = False
    _timed: dict[tuple, TimedRun] = field(default_factory=dict)
    _timed_left: dict[tuple, tuple[SimRequest, ...]] = field(default_factory=dict)
    _count: list[int] = field(default_factory=lambda: [0])  # shared with `exact()` views

    @property
    def simulations(self) -> int:
        """simulate() calls made (for benchmarks and tests of the cache)."""
        return self._count[0]

    def exact(self) -> "Estimator":
        """A view of this estimator that simulates restarts on derived workloads (`approx_restarts`
        False); it shares every cache (their keys tell the two apart)."""
        return dataclasses.replace(self, approx_restarts=False)

    def variant(self, model: str, threads: int) -> str:
        """The name this estimator knows `model`'s engines with `threads` cores per rank by (the
        model's own name for threads = 1). Registers the variant in `models` (a copy of the
        problem's, see `Planner`), shared with the `exact()` views."""
        if threads == 1:
            return model
        name = f"{model}@threads={threads}"
        while name in self.models and self._variants.get(name) != (model, threads):
            name += "'"  # a configured model already has that name
        if name not in self._variants:
            self._variants[name] = (model, threads)
            self.models[name] = self.models[model]
        return name

    def latency(self, model: str, tp: int) -> LatencyModel:
        key = (model, tp)
        if key not in self._lat:
            base = self._variants.get(model)
            if base is None:
                self._lat[key] = self.latency_fn(self.models[model], tp)
            else:
                real, threads = base
                self._lat[key] = (self.threads_fn(self.models[real], tp, threads)
                                  if self.threads_fn is not None
                                  else assumed_threads_latency(self.latency(real, tp),
                                                              self.models[real], tp, threads))
        return self._lat[key]

    def load_time(self, model: str, tp: int) -> float:
        return self.latency(model, tp).load_time_s

    def kv_bytes(self, model: str, tp: int) -> int:
        return int(self.kv_bytes_fn(self.models[model], tp))

    def fits(self, model: str, tp: int) -> bool:
        """vLLM refuses to start an engine whose KV cache cannot hold one max-length sequence."""
        spec = self.models[model]
        need_blocks = -(-spec.max_model_len // spec.block_size)
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
                block_size=spec.block_size,
                prefix_caching=spec.prefix_caching,
            )
        return self._limits[key]

    def run(self, model: str, tp: int, dp: int, work: Workload, kept: bool = False) -> PlanRun:
        """Every replica run to completion (cached). `kept`: the engine running this very shape
        continues (no restart); it matters only for derived workloads (see `_derived_run`)."""
        if work.pos is not None:
            return self._derived_run(model, tp, dp, work, kept)
        key = (model, tp, dp, work.fingerprint)
        hit = self._runs.get(key)
        if hit is not None:
            return hit
        deps = self._deps(model, work)
        if extrapolates(self, model, work):
            run = extrapolated_run(self, model, tp, dp, work)
            self._runs[key] = run
            return run
        lat, lim = self.latency(model, tp), self.limits(model, tp)
        flops = self._request_flops(model, work)
        finish: list[float] = []
        index: list[int] = []
        kv = []
        total = 0.0
        for part, idx in split_replicas(work.requests, dp, deps):
            if not part:
                continue
            # simulate never mutates its input
            res = simulate(part, lim, lat, kv_trace=True, depends=deps)
            self._count[0] += 1
            total = max(total, res.total_time_s)
            times, used, running = res.kv_trace
            kv.append((np.asarray(times), np.asarray(used) * lim.block_size, np.asarray(running)))
            ft = res.finish_times_s
            finish.extend(ft[q.rid] for q in part)
            index.extend(idx)
        fin = np.asarray(finish, dtype=float)
        order = np.argsort(fin, kind="stable")
        idx = np.asarray(index, dtype=np.int64)[order]
        run = PlanRun(total, fin[order], np.cumsum(flops[idx]), idx, kv)
        self._runs[key] = run
        return run

    def _deps(self, model: str, work: Workload) -> dict[int, list[int]] | None:
        """Which of `work`'s requests wait for which (same model), or None (cached per workload)."""
        if self.chains and "deps" not in work._cache:
            work._cache["deps"] = self._chains(model, work.requests)
        return work._cache.get("deps")

    def _chains(self, model: str, requests) -> dict[int, list[int]] | None:
        return same_model_deps(self._variants.get(model, (model,))[0], requests) \
            if self.chains else None

    def timed_run(self, model: str, tp: int, dp: int, requests: tuple[SimRequest, ...]) -> TimedRun:
        """`requests` (sorted by rid, `arrival_s` in engine time) run to completion on (tp, dp),
        with every request's admission and finish time (cached by requests and arrivals)."""
        key = (model, tp, dp, TimedRun.fingerprint(requests))
        hit = self._timed.get(key)
        if hit is not None:
            return hit
        deps = self._chains(model, requests)
        lat, lim = self.latency(model, tp), self.limits(model, tp)
        parts, finish, admitted, total = [], {}, {}, 0.0
        for part, _ in split_replicas(requests, dp, deps):
            if not part:
                continue
            res = simulate(part, lim, lat, depends=deps, admissions=True)
            self._count[0] += 1
            parts.append((tuple(part), deps))
            finish.update(res.finish_times_s)
            admitted.update(res.admitted_s)
            total = max(total, res.total_time_s)
        run = TimedRun(tuple(parts), finish, admitted, total, key)
        self._timed[key] = run
        return run

    def timed_left(self, run: TimedRun, t_s: float) -> tuple[SimRequest, ...]:
        """`run`'s requests unfinished `t_s` into it (engine time), with the tokens they generated
        by then (the run cut at t_s; cached)."""
        key = run.key + (round(t_s, 9),)
        if key not in self._timed_left:
            model, tp = run.key[0], run.key[1]
            lat, lim = self.latency(model, tp), self.limits(model, tp)
            left: list[SimRequest] = []
            for part, deps in run.parts:
                left.extend(simulate(part, lim, lat, until_s=t_s, depends=deps).remaining)
                self._count[0] += 1
            self._timed_left[key] = tuple(sorted(left, key=_rid))
        return self._timed_left[key]

    def _request_flops(self, model: str, work: Workload) -> np.ndarray:
        t = work.tokens  # useful_flops, vectorised over the workload
        tokens = (t[:, 2] - t[:, 3]).clip(0) + np.where(t[:, 3] == 0, t[:, 1], 0)
        return self.models[model].flops_per_token * tokens.astype(float)

    def _derived_run(self, model: str, tp: int, dp: int, work: Workload, kept: bool) -> PlanRun:
        """A derived workload's run on (tp, dp).

        The engine that produced the position keeps running (`kept`, same shape): exactly the rest
        of its root run, no simulation (a stage cut at t is a prefix of the run to completion: the
        simulator is deterministic and the engine's state at t is the same). Any other engine
        starts cold on the requests left (in-flight ones re-prefilled with what they generated):
        simulated on them (`approx_restarts` False), or read off the root's run on that shape from
        the moment it had finished the same fraction of the requests, plus the re-prefill
        (`_restart_run`)."""
        pos = work.pos
        cont = kept and (tp, dp) == (pos.tp, pos.dp)
        key = (model, tp, dp, work.fingerprint, cont, self.approx_restarts and not cont)
        hit = self._runs.get(key)
        if hit is not None:
            return hit
        if cont:
            run = self.run(model, tp, dp, pos.root).suffix(pos.t_s)
        elif self.approx_restarts:
            run = self._restart_run(model, tp, dp, work)
        else:
            run = self.run(model, tp, dp, self.materialize(work))
        self._runs[key] = run
        return run

    def _restart_run(self, model: str, tp: int, dp: int, work: Workload) -> PlanRun:
        """Estimated cold run of a derived workload: the root's run on this shape from when it had
        finished the same fraction of the requests, delayed by re-prefilling what the requests in
        flight hold (prompt + generated; a warm run has those tokens in its KV cache already)."""
        pos = work.pos
        root = self.run(model, tp, dp, pos.root)
        rest = root.suffix(root.time_of_fraction(pos.frac))
        src = self.run(model, pos.tp, pos.dp, pos.root)
        held, n = src.in_flight(pos.t_s)  # what the cut run holds, from its trace
        sq = held * held / n if n else 0.0
        if held <= 0:
            return rest
        lat, lim = self.latency(model, tp), self.limits(model, tp)
        # per replica, at most what its KV cache holds: the rest waits and is prefilled in turn,
        # as the not yet started requests of the warm run are
        cap = lim.num_kv_blocks * lim.block_size
        share = min(1.0, cap * dp / held)
        tokens = held / dp * share
        iters = np.ceil(tokens / lim.max_num_batched_tokens)
        delay = (iters * (lat.c0 + lat.allreduce_fixed_s) + tokens * (lat.c1 + lat.allreduce_s_per_token)
                 + lat.c2 * sq / 2.0 / dp * share)
        return PlanRun(rest.total_s + delay, rest.finish_sorted + delay, rest.work_cum)

    def materialize(self, work: Workload) -> Workload:
        """A derived workload as a root one: its requests with their generated tokens (cached)."""
        if work.pos is None:
            return work
        if "root" not in work._cache:
            work._cache["root"] = Workload.of(work.requests)
        return work._cache["root"]

    def advance(self, model: str, tp: int, dp: int, work: Workload, elapsed_s: float,
                kept: bool = False) -> Workload:
        """The work left after running `elapsed_s` seconds (engine ready) on this plan, as a
        derived workload: a position on a run of a root workload (see `_derived_run`). Its
        requests are only built when asked for (`_left`)."""
        if elapsed_s <= 0:
            return work
        key = (model, tp, dp, work.fingerprint, round(elapsed_s, 9), kept, self.approx_restarts)
        hit = self._advanced.get(key)
        if hit is not None:
            return hit
        root, start = work, 0.0
        if work.pos is not None:
            pos = work.pos
            if kept and (tp, dp) == (pos.tp, pos.dp):
                root, start = pos.root, pos.t_s
            elif self.approx_restarts:
                root = pos.root
                start = self.run(model, tp, dp, root).time_of_fraction(pos.frac)
            else:
                root = self.materialize(work)
        run = self.run(model, tp, dp, root)
        t = start + elapsed_s
        pos = Position(root, tp, dp, t, run.done_fraction(t))
        out = Workload(None, f"{root.fingerprint}@{tp}x{dp}:{t!r}", None, pos,
                       lambda: self._left(model, pos))
        self._advanced[key] = out
        return out

    def _left(self, model: str, pos: Position) -> tuple[SimRequest, ...]:
        """The root's requests unfinished `pos.t_s` into its run on (tp, dp), with the tokens they
        generated by then: the run cut at t_s (exact; large roots: the first requests of each
        replica's FCFS queue as many as the fitted line finishes, in-flight ones as they were)."""
        root, tp, dp, t = pos.root, pos.tp, pos.dp, pos.t_s
        lat, lim = self.latency(model, tp), self.limits(model, tp)
        left: list[SimRequest] = []
        deps = self._deps(model, root)
        big = extrapolates(self, model, root)
        for part, _ in split_replicas(root.requests, dp, deps):
            if not part:
                continue
            if big:
                a, b, _ = fitted_line(self, model, tp, root)
                n_done = int(np.clip((t - a) / b, 0, len(part))) if b > 0 else len(part)
                left.extend(part[n_done:])
                continue
            res = simulate(part, lim, lat, until_s=t, depends=deps)
            self._count[0] += 1
            left.extend(res.remaining)
        left.sort(key=_rid)
        return tuple(r for r in left if r.output_len > r.generated)

    def work_total(self, model: str, work: Workload) -> float:
        key = (model, work.fingerprint)
        if key not in self._work_total:
            self._work_total[key] = float(self._request_flops(model, work).sum())
        return self._work_total[key]
