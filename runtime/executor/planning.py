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
  speed-up of `scheduler.latency.assumed_threads_latency`. Either base is then corrected by what
  the engines served (`scheduler.online`: the shape's own fit, else one derived from the model's
  other shapes or other models'), refitted before each plan (`refit_calibration`) from the
  windows `<state_dir>/calibration.json` keeps (`runtime.persist`); `runtime.executor.latency_source`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from runtime.config import Config
from runtime.engines.procs import host_memory_bytes
from runtime.executor.latency_source import DEFAULT_STOP_S, UNSERVED_CAUTION, LatencySource
from runtime.executor.pool_state import Req, ReqState
from runtime.endpoints import EMBEDDINGS
from runtime.usage import usage_of
from scheduler.lengths import LengthModel
from scheduler.online import ShapeFit, refit
from scheduler.served import Pending, Served, ShapeKey, ShapeWindow
from scheduler.placement import gpu_kv_bytes_per_rank
from scheduler.planner import PlanningProblem
from scheduler.simulator import EngineLimits, kv_blocks
from scheduler.types import DevicePool, ExecPlan, ModelSpec, Schedule, SimRequest, Stage

ReplicaKey = tuple[str, int, tuple[int, ...]]  # (model, tp, devices of one replica)


def model_specs(cfg: Config, device_kind: str | None = None) -> dict[str, ModelSpec]:
    """The planner's view of every configured model (architecture + engine limits) on devices of
    `device_kind` (default: `[devices] kind`; its KV block size depends on it)."""
    kind = device_kind or cfg.devices.kind
    out = {}
    for m in cfg.models:
        a = m.architecture(cfg.base_dir)
        out[m.name] = ModelSpec(
            name=m.name, num_layers=a.num_layers, hidden_size=a.hidden_size, num_heads=a.num_heads,
            num_kv_heads=a.num_kv_heads, intermediate_size=a.intermediate_size,
            vocab_size=a.vocab_size, dtype_bytes=m.dtype_bytes, max_model_len=m.max_model_len,
            max_num_seqs=m.max_num_seqs, max_num_batched_tokens=m.max_num_batched_tokens,
            num_experts=a.num_experts, experts_per_token=a.experts_per_token,
            prefix_caching=m.prefix_caching, block_size=m.kv_block_size(kind))
    return out


def engine_limits(spec: ModelSpec, tp: int, kv: Callable[[ModelSpec, int], int]) -> EngineLimits:
    """The limits the planner simulates one engine of (spec, tp) with (`scheduler.estimator`)."""
    return EngineLimits.for_spec(spec, kv_blocks(spec, tp, int(kv(spec, tp))))


def refit_calibration(cfg: Config, pool: DevicePool, specs: Mapping[str, ModelSpec],
                      state_dir: Path, windows: Mapping[ShapeKey, ShapeWindow],
                      fits: Mapping[ShapeKey, ShapeFit]) -> dict[ShapeKey, ShapeFit]:
    """The online calibration's fits for what `windows` hold, against the current bases (a
    profile measured since makes its shape refit); `fits` itself when nothing changed. Reads
    profiles (a stat each) and replays served requests: `serve` runs it in a thread."""
    keys = [k for k in windows if k[0] in specs and k[3] == pool.signature]
    base = LatencySource.load(state_dir, pool, sorted({k[0] for k in keys}), {})
    kv = kv_bytes_fn(cfg, pool)
    bases = {k: (*base.base(specs[k[0]], k[1], k[2]), engine_limits(specs[k[0]], k[1], kv))
             for k in keys}
    return refit(windows, bases, fits)


def served_record(body: Any, prompt_tokens: int, queued_s: float, sent_s: float,
                  done_s: float) -> Served | None:
    """An answered request as an online-calibration observation (tokens from its `usage`; the
    prompt as validation counted it when the engine does not say); None without a usage."""
    if not isinstance(body, dict) or not isinstance(body.get("usage"), dict):
        return None
    usage = usage_of(body)
    prompt = usage.prompt if usage.prompt else max(1, prompt_tokens)
    # tokens the engine's prefix cache already held were not computed: the replay (which has no
    # prefixes) prefills only the rest, else every hit would read as a faster engine
    if usage.cached and usage.cached < prompt:
        prompt -= usage.cached
    return Served(min(queued_s, sent_s), sent_s, done_s, prompt,
                  usage.output if usage.output else 1)


def pending_record(req: Req, queued_s: float) -> Pending | None:
    """A request in flight (sent, no answer yet) as the online calibration replays it: to its
    output cap, which its true length cannot pass; None when it was not sent."""
    if req.sent_s is None:
        return None
    return Pending(min(queued_s, req.sent_s), req.sent_s, max(1, req.item.prompt_tokens),
                   max(1, req.item.max_tokens))


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
    capped by each request's max_tokens, prompt estimates corrected by what the engines counted
    (`LengthModel.prompt_scale`); an embedding request is one forward pass (length 1).
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
        scale = lengths.prompt_scale(model, url)  # estimates as the engines count them
        if url == EMBEDDINGS:
            outs = np.ones(len(idx), dtype=np.int64)
        else:
            outs = np.minimum(lengths.sample(model, url, caps, rng), caps)
        work.setdefault(model, []).extend(
            SimRequest(rid=i, prompt_len=max(1, round(reqs[i].item.prompt_tokens * scale)
                                             + reqs[i].known_tokens),
                       output_len=max(1, int(o)), upstream=_upstream(reqs, i, index),
                       prefix=reqs[i].item.prefix)
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
                 start_times: dict[tuple[str, int, int], float], plan_no: int,
                 running: dict[str, ExecPlan], spares: tuple[float, ...] | None = None,
                 no_spare_s: float = 0.0,
                 fits: Mapping[ShapeKey, ShapeFit] | None = None,
                 starting: Mapping[str, tuple[float, int, bool]] | None = None,
                 stop_s: float | None = None,
                 asleep: dict[str, ExecPlan] | None = None,
                 sleep_room: float | None = None,
                 slept_bytes: Mapping[str, float] | None = None) -> PlanningProblem:
    """The problem of a pool's `plan_no`-th plan (1 = the first) over its unfinished `reqs`: the
    one way both `serve` (the executor, at every pass) and `samullm plan` build it, so that for the
    same input, config and state dir the two predict the same makespan. `fits`: the online
    calibration (`refit_calibration`), ignored when `[scheduler] online_calibration` is off.
    `starting`: running engines not serving yet, model -> (seconds since their start began, most
    engines seen starting with them, whether it started in a spare process); each still owes its
    expected start (plus `no_spare_s` when the pool keeps spares and it found none ready) minus
    that (at least a second: one that takes longer than expected is about to be up, not up).
    `stop_s`: an engine stop as measured (None: `DEFAULT_STOP_S`); `running` may hold engines
    whose model has no work (kept warm: the problem's `idle`). Its `groups` are the requests'
    batches: `plan` then predicts each batch's completion (`batch_completion`), and the least
    makespan any schedule could have (`lower_bound`). `asleep`: the plans of the engines asleep
    (`slots.EngineSlots.asleep`), woken instead of started by a stage with the same plan.
    `sleep_room`: what the engines a stage replaces may still hold asleep (bytes; None: they are
    stopped), `slept_bytes` what an engine of a model held asleep as measured (`engine_bytes`)."""
    seed = cfg.scheduler.seed
    work = sample_work(reqs, lengths, np.random.default_rng([seed, plan_no]))
    latency = LatencySource.load(state_dir, pool, list(work), start_times,
                                 fits if cfg.scheduler.online_calibration else None,
                                 UNSERVED_CAUTION)
    problem = build_problem(cfg, pool, specs, latency, work, running, seed=seed + plan_no,
                            spares=spares, no_spare_s=no_spare_s,
                            stop_s=DEFAULT_STOP_S if stop_s is None else stop_s)
    problem.asleep = {m: p for m, p in (asleep or {}).items() if m in work}
    if sleep_room is not None:
        problem.sleep_room = sleep_room
        problem.engine_bytes = engine_bytes(cfg, pool, specs, slept_bytes or {})
    problem.groups = batch_groups(reqs, work)
    problem.lower_bound = True
    for m, (elapsed, n, in_spare) in (starting or {}).items():
        if m in problem.running:
            plan = problem.running[m]
            expected = (latency.threads(specs[m], plan.tp, plan.threads).load_time_s
                        * pool.start_factor(n))
            if spares is not None and not in_spare:
                expected += no_spare_s
            problem.warmup[m] = max(1.0, expected - elapsed)
    return problem


def sleep_budget(cfg: Config) -> int:
    """What CPU engines asleep may hold in all (bytes): `[devices] cpu_sleep_gib`, by default a
    quarter of the host's memory (`slots.EngineSlots`)."""
    gib = cfg.devices.cpu_sleep_gib
    return host_memory_bytes() // 4 if gib is None else int(gib * 2**30)


def engine_bytes(cfg: Config, pool: DevicePool, specs: Mapping[str, ModelSpec],
                 measured: Mapping[str, float]) -> dict[str, float]:
    """Per model, the memory one engine holds asleep: as `measured` (its processes' PSS when one
    last went to sleep); else its weights and KV space plus the most that any measured engine
    held beyond its own (the processes' base: ~0.1 GiB for the demo models on CPU)."""
    kv = kv_bytes_fn(cfg, pool)

    def own(spec: ModelSpec) -> float:
        return spec.weight_bytes + kv(spec, 1)
    base = max((b - own(specs[m]) for m, b in measured.items() if m in specs), default=0.0)
    return {m: float(measured[m]) if m in measured else own(spec) + max(0.0, base)
            for m, spec in specs.items()}


def batch_groups(reqs: Sequence[Req], work: Mapping[str, Sequence[SimRequest]]
                 ) -> dict[str, dict[int, str]]:
    """Per model, rid -> the batch id of that request (`sample_work`: rid = position in `reqs`)."""
    return {m: {r.rid: reqs[r.rid].batch_id for r in rs} for m, rs in work.items()}


def batch_completion(schedule: Schedule) -> dict[str, float] | None:
    """Per batch with requests left, seconds from the plan's start until its last request is
    predicted to finish (computed by `plan` where the planner runs, `PlanningProblem.groups`);
    None when the planner did not say (one that ignores `groups`, e.g. a test's)."""
    got = getattr(schedule, "group_finish_s", None)
    if got is None:
        return None
    return {str(b): min(float(s), schedule.makespan_s) for b, s in sorted(got.items())}


def lower_bound(schedule: Schedule) -> float | None:
    """The least makespan any schedule of the planned work could have under the same cost model
    (`scheduler.bounds`, computed where the planner runs, `PlanningProblem.lower_bound`); None
    when the planner did not say."""
    got = getattr(schedule, "lower_bound_s", None)
    return None if got is None else float(got)


def build_problem(cfg: Config, pool: DevicePool, specs: dict[str, ModelSpec], latency: LatencySource,
                  work: dict[str, list[SimRequest]], running: dict[str, ExecPlan],
                  seed: int, spares: tuple[float, ...] | None = None,
                  no_spare_s: float = 0.0, stop_s: float = 0.0) -> PlanningProblem:
    """`spares`: per spare engine process, the CPU seconds of import it has left (0: ready; None:
    the gateway keeps none); a start without a ready one costs `no_spare_s` more (`scheduler.spares`).
    `running`: every engine up; those of models without work are the problem's `idle`."""
    models = {m: specs[m] for m in work}
    return PlanningProblem(
        models=models, work=work, pool=pool, latency=latency, kv_bytes_per_rank=kv_bytes_fn(cfg, pool),
        running={m: p for m, p in running.items() if m in models}, top_k=cfg.scheduler.top_k,
        seed=seed, threads_latency=latency.threads, spares=spares, no_spare_s=no_spare_s,
        idle={m: p for m, p in running.items() if m not in models}, stop_s=stop_s,
        batch_slack=cfg.scheduler.batch_slack)


def stage_replicas(stage: Stage) -> dict[ReplicaKey, ExecPlan]:
    """Replica keys the stage wants, one engine each."""
    return {(p.model, p.tp, tuple(devs)): p for p in stage.plans for devs in p.replicas()}


def describe_stage(stage: Stage) -> list[dict]:
    return [{"model": p.model, "tp": p.tp, "dp": p.dp, "devices": list(p.devices)}
            | ({"threads": p.threads} if p.threads > 1 else {}) for p in stage.plans]


def describe_schedule(schedule: Schedule) -> list[dict]:
    """Every stage of a plan, seconds from the plan (the status page's Gantt chart)."""
    return [{"start_s": round(st.start_s, 3), "end_s": round(st.end_s, 3),
             "plans": describe_stage(st)} for st in schedule.stages]
