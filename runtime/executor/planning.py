"""From the executor's observed state to a `PlanningProblem`, and from a plan's first stage to engines.

Planning inputs (all observed, never the submission-time guesses):
- work: every unfinished request of the active pool (waiting for upstream requests, queued or in
  flight; a waiting one names them, `sample_work`), its output length drawn
  from the learned `LengthModel` (updated by every finished request) and capped by its `max_tokens`;
  in-flight requests count from scratch (the engine does not tell us how far they are);
- running: the plans of the engines alive now, so the planner can keep them (no reload);
- latency per (model, tp): a measured profile stored under `<state_dir>/profiles/` when there is
  one, else the analytic roofline model of `scheduler.latency`; per (model, tp, threads) for CPU
  ranks on several cores: the profile of that shape, else the threads = 1 latency with the assumed
  speed-up of `scheduler.latency.assumed_threads_latency`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from runtime.persist import load_profile
from runtime.config import Config
from runtime.executor.pool_state import Req, ReqState
from scheduler.gpu_profiles import gpu_latency_model
from scheduler.latency import LatencyModel, analytic_latency_model, assumed_threads_latency
from scheduler.lengths import LengthModel
from scheduler.placement import gpu_kv_bytes_per_rank, thread_counts, tp_degrees
from scheduler.planner import PlanningProblem
from scheduler.types import DevicePool, ExecPlan, ModelSpec, SimRequest, Stage

EMBEDDINGS_URL = "/v1/embeddings"
# vLLM CPU engine start (spawn, weights, KV allocation, warm-up) measured on this machine: 21-30 s;
# planning with a zero reload cost would make re-plans churn engines for nothing.
DEFAULT_CPU_LOAD_S = 25.0
ReplicaKey = tuple[str, int, tuple[int, ...]]  # (model, tp, devices of one replica)


def model_specs(cfg: Config) -> dict[str, ModelSpec]:
    """The planner's view of every configured model (architecture + engine limits)."""
    out = {}
    for m in cfg.models:
        a = m.architecture(cfg.base_dir)
        out[m.name] = ModelSpec(
            name=m.name, num_layers=a.num_layers, hidden_size=a.hidden_size, num_heads=a.num_heads,
            num_kv_heads=a.num_kv_heads, intermediate_size=a.intermediate_size,
            vocab_size=a.vocab_size, dtype_bytes=m.dtype_bytes, max_model_len=m.max_model_len,
            max_num_seqs=m.max_num_seqs, max_num_batched_tokens=m.max_num_batched_tokens,
            num_experts=a.num_experts, experts_per_token=a.experts_per_token)
    return out


@dataclass
class LatencySource:
    """Latency per (model, tp) for the planner. Per-iteration costs: the profile stored under
    `<state_dir>/profiles/` when one was measured, else on GPUs the committed operator-level model
    (`scheduler.gpu_profiles`), else the analytic roofline. Load time: the engine start time this
    runtime measured for (model, tp) when it has one (the truth on this machine), else the profile's
    or GPU model's estimate, else DEFAULT_CPU_LOAD_S. Loaded before planning (the profiler may have
    written a profile since), so the planner's thread does no I/O."""

    table: dict[tuple[str, int], LatencyModel]
    device: str
    start_times: dict[tuple[str, int], float]
    threaded: dict[tuple[str, int, int], LatencyModel] = field(default_factory=dict)
    # a fresh engine's one-off slowness after it is healthy (its first requests, and every token
    # count it runs for the first time), from the profile's served calibration; charged with the
    # start, since every (re)started engine pays it once
    cold: dict[tuple[str, int, int], float] = field(default_factory=dict)
    # start times here are those of starts in a spare engine process (runtime.engines.spares); what a
    # start without one costs more is the planner's (`PlanningProblem.spares`, `no_spare_s`)

    @classmethod
    def load(cls, state_dir: Path, pool: DevicePool, models: Iterable[str],
             start_times: dict[tuple[str, int], float]) -> "LatencySource":
        table, threaded, cold = {}, {}, {}
        for m in models:
            for tp in tp_degrees(pool):
                for th in thread_counts(pool):
                    prof = load_profile(state_dir, m, tp, pool.signature, th)
                    if prof is None:
                        continue
                    if th == 1:
                        table[(m, tp)] = prof.latency
                    else:
                        threaded[(m, tp, th)] = prof.latency
                    cold[(m, tp, th)] = cold_start_s(prof.meta)
        return cls(table, pool.signature, dict(start_times), threaded, cold)

    def _base(self, spec: ModelSpec, tp: int) -> LatencyModel:
        hit = self.table.get((spec.name, tp))
        if hit is not None:
            return hit
        if self.device == "cpu":
            return analytic_latency_model(spec, tp, "cpu")
        for gpu in (self.device, "cuda"):  # a GPU kind without coefficients: the generic ones
            try:
                return gpu_latency_model(spec, tp, gpu)
            except ValueError:
                continue
        return analytic_latency_model(spec, tp, "cuda")

    def __call__(self, spec: ModelSpec, tp: int) -> LatencyModel:
        lat = self._start(spec, tp)
        cold = self.cold.get((spec.name, tp, 1), 0.0)
        return lat.with_load_time(lat.load_time_s + cold) if cold else lat

    def _start(self, spec: ModelSpec, tp: int) -> LatencyModel:
        lat = self._base(spec, tp)
        measured = self.start_times.get((spec.name, tp))
        if measured is not None:
            return lat.with_load_time(measured)
        if lat.load_time_s > 0 or self.device != "cpu":
            return lat
        return lat.with_load_time(DEFAULT_CPU_LOAD_S)

    def threads(self, spec: ModelSpec, tp: int, threads: int) -> LatencyModel:
        """Ranks on `threads` cores each: that shape's profile, else the assumed speed-up over
        threads = 1. The start time is the (model, tp) one either way (one engine starts alike)."""
        one = self(spec, tp)
        hit = self.threaded.get((spec.name, tp, threads))
        if hit is None:
            return assumed_threads_latency(one, threads)
        start = self._start(spec, tp).load_time_s
        return hit.with_load_time(start + self.cold.get((spec.name, tp, threads), 0.0))


def cold_start_s(meta: dict) -> float:
    """A profile's fresh-engine cost: the first requests' extra plus the new-token-count cost times
    the most new counts one of its calibration sets ran (the shapes a whole run visits)."""
    cal = meta.get("served_calibration") if isinstance(meta, dict) else None
    if not isinstance(cal, dict):
        return 0.0
    try:
        shapes = max((int(s.get("new_shapes", 0)) for s in cal.get("sets", [])), default=0)
        return max(0.0, float(cal.get("first_request_s", 0.0))
                   + float(cal.get("new_shape_s", 0.0)) * shapes)
    except (TypeError, ValueError, AttributeError):
        return 0.0


def kv_bytes_fn(cfg: Config, pool: DevicePool) -> Callable[[ModelSpec, int], int]:
    """KV bytes one TP rank gets: the configured CPU KV space, or what a GPU has left after weights."""
    if pool.kind == "cpu":
        return KvBytes(cpu_bytes=int(cfg.devices.cpu_kvcache_gib * (1 << 30)))
    return KvBytes(gpu_memory=pool.memory_bytes, gpu_util=cfg.devices.gpu_memory_utilization)


@dataclass(frozen=True)
class KvBytes:
    """`kv_bytes_fn`'s answer: a plain object rather than a closure, so a `PlanningProblem` pickles
    (the planner runs in a process of its own, `runtime.executor.planner_process`)."""

    cpu_bytes: int | None = None  # CPU: the configured KV space, the same for every engine
    gpu_memory: int = 0
    gpu_util: float = 0.9

    def __call__(self, spec: ModelSpec, tp: int) -> int:
        if self.cpu_bytes is not None:
            return self.cpu_bytes
        return gpu_kv_bytes_per_rank(spec, tp, self.gpu_memory, self.gpu_util)


def sample_work(reqs: Sequence[Req], lengths: LengthModel,
                rng: np.random.Generator) -> dict[str, list[SimRequest]]:
    """SimRequests per model (rid = position in `reqs`), output lengths drawn from `lengths` and
    capped by each request's max_tokens; an embedding request is one forward pass (length 1).
    A dependent request's prompt is its own tokens plus the outputs of its upstream requests that
    finished; those still in `reqs` are its `upstream` (the planner adds their drawn outputs and
    starts it after their predicted finish)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(reqs):
        groups.setdefault((r.model, r.item.url), []).append(i)
    index = {(r.batch_id, r.item.custom_id): i for i, r in enumerate(reqs)} \
        if any(r.state is ReqState.WAITING for r in reqs) else {}
    work: dict[str, list[SimRequest]] = {}
    for (model, url), idx in sorted(groups.items()):
        caps = np.array([max(1, reqs[i].item.max_tokens) for i in idx], dtype=np.int64)
        if url == EMBEDDINGS_URL:
            outs = np.ones(len(idx), dtype=np.int64)
        else:
            outs = np.minimum(lengths.sample(model, url, caps, rng), caps)
        work.setdefault(model, []).extend(
            SimRequest(rid=i, prompt_len=max(1, reqs[i].item.prompt_tokens + reqs[i].known_tokens),
                       output_len=max(1, int(o)), upstream=_upstream(reqs, i, index))
            for i, o in zip(idx, outs))
    return work


def _upstream(reqs: Sequence[Req], i: int, index: dict[tuple[str, str], int]
              ) -> tuple[tuple[str, int], ...]:
    r = reqs[i]
    if r.state is not ReqState.WAITING or not index:
        return ()
    ups = (index.get((r.batch_id, cid)) for cid in r.item.depends_on)
    return tuple((reqs[j].model, j) for j in ups if j is not None)


def running_plans(keys: Iterable[ReplicaKey]) -> dict[str, ExecPlan]:
    """Group the live replicas of each model into one ExecPlan (replicas in device order)."""
    by_model: dict[str, list[ReplicaKey]] = {}
    for k in keys:
        by_model.setdefault(k[0], []).append(k)
    plans = {}
    for model, ks in by_model.items():
        tp = ks[0][1]
        ks = sorted(k for k in ks if k[1] == tp)  # mixed TP cannot happen; keep the first degree
        plans[model] = ExecPlan(model=model, tp=tp, dp=len(ks),
                                devices=tuple(d for k in ks for d in k[2]),
                                threads=max(1, len(ks[0][2]) // tp))
    return plans


def plan_problem(cfg: Config, pool: DevicePool, specs: dict[str, ModelSpec], state_dir: Path,
                 reqs: Sequence[Req], lengths: LengthModel,
                 start_times: dict[tuple[str, int], float], plan_no: int,
                 running: dict[str, ExecPlan], spares: tuple[float, ...] | None = None,
                 no_spare_s: float = 0.0) -> PlanningProblem:
    """The problem of a pool's `plan_no`-th plan (1 = the first) over its unfinished `reqs`: the
    one way both `serve` (the executor, at every pass) and `samullm plan` build it, so that for the
    same input, config and state dir the two predict the same makespan."""
    seed = cfg.scheduler.seed
    work = sample_work(reqs, lengths, np.random.default_rng([seed, plan_no]))
    latency = LatencySource.load(state_dir, pool, list(work), start_times)
    return build_problem(cfg, pool, specs, latency, work, running, seed=seed + plan_no,
                         spares=spares, no_spare_s=no_spare_s)


def build_problem(cfg: Config, pool: DevicePool, specs: dict[str, ModelSpec], latency: LatencySource,
                  work: dict[str, list[SimRequest]], running: dict[str, ExecPlan],
                  seed: int, spares: tuple[float, ...] | None = None,
                  no_spare_s: float = 0.0) -> PlanningProblem:
    """`spares`: per spare engine process, the CPU seconds of import it has left (0: ready; None:
    the gateway keeps none); a start without a ready one costs `no_spare_s` more (`scheduler.spares`)."""
    models = {m: specs[m] for m in work}
    return PlanningProblem(
        models=models, work=work, pool=pool, latency=latency, kv_bytes_per_rank=kv_bytes_fn(cfg, pool),
        running={m: p for m, p in running.items() if m in models}, top_k=cfg.scheduler.top_k,
        seed=seed, threads_latency=latency.threads, spares=spares, no_spare_s=no_spare_s)


def stage_replicas(stage: Stage) -> dict[ReplicaKey, ExecPlan]:
    """Replica keys the stage wants, one engine each."""
    return {(p.model, p.tp, tuple(devs)): p for p in stage.plans for devs in p.replicas()}


def describe_stage(stage: Stage) -> list[dict]:
    return [{"model": p.model, "tp": p.tp, "dp": p.dp, "devices": list(p.devices)}
            | ({"threads": p.threads} if p.threads > 1 else {}) for p in stage.plans]
