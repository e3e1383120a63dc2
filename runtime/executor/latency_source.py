"""Where the planner's per-shape latency and engine start times come from (`LatencySource`).

Per (model, tp[, threads]): a measured profile stored under `<state_dir>/profiles/` when there is
one, else on GPUs the committed operator-level model (`scheduler.gpu_profiles`), else the analytic
roofline (`scheduler.latency`); either base corrected by the online calibration
(`scheduler.online`). `samullm plan` shows each shape's source (`latency_sources`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from runtime.persist import load_profile
from scheduler.calibration import scale_latency
from scheduler.gpu_profiles import gpu_latency_model
from scheduler.latency import LatencyModel, analytic_latency_model, assumed_threads_latency
from scheduler.online import ShapeFit
from scheduler.served import ShapeKey
from scheduler.placement import thread_counts, tp_degrees
from scheduler.types import DevicePool, ModelSpec
from scheduler.unserved import Correction, correction

# vLLM CPU engine start (spawn, weights, KV allocation, warm-up) measured on this machine: 21-30 s;
# planning with a zero reload cost would make re-plans churn engines for nothing.
# an engine start on CPU before any was measured: one from a ready spare process (the planner adds
# the import for a start that finds none, `scheduler.spares`). With one core per rank its engine
# core and workers are forked, not spawned (`runtime.engines.api_server`): the demo models' starts
# in a spare at TP 1, as the planner stores them (`alone_start_s`: with the contention of starts
# beside them taken out), took a median 4.6 s on this 2-core machine (4.5-4.7 s per model; 53 starts
# in the fairness and fresh benches' runs of 6 Dec 2026), 3.5-4.0 s on 5 Dec. At 3.7 s, the first
# plan of `bench.fresh`'s sequential strategy (three stages, each starting its engines) was
# predicted 21-25 % short, and 4.6 s shorter than the same plan priced with the profiles and the
# starts measured. A rank on several cores still spawns them, and those took 16.1-16.6 s (5 Dec
# 2026, `bench.demo_setup`'s `refresh_start_times`, quiet machine)
DEFAULT_CPU_LOAD_S = 4.6
DEFAULT_CPU_SPAWN_LOAD_S = 14.5
# an engine stop (SIGTERM to its process group until it is gone) before any was measured: the demo
# models' stops took 0.5-1.4 s on the 2-core development machine (4 Dec 2026, `bench/fresh.py`
# events); the runtime starts nothing while one is in progress (`runtime.executor.slots`)
DEFAULT_STOP_S = 1.0
# a shape never served nor profiled, of a model that has one that was: its (derived or roofline)
# estimate is priced this much slower, so the planner leaves what it knows only for a shape
# predicted clearly faster. On 5 Dec (`bench/fresh.py`) `sequential` moved small and tiny-a from
# served shapes to a TP 2 derived from medium's and ran 34 % slower than with profiles; the
# derived shapes' errors seen there were 10-30 %.
UNSERVED_CAUTION = 0.15
# a fresh CPU engine's one-off cost at TP > 1 before any was measured (nor profiled) for any model:
# its first requests; the demo models' TP-2 profiles paid 2.18-2.28 s, their TP-1 ones 0.04-0.9 s
# (4 Dec 2026, `samullm profile --quick`'s served calibration, 2-core development machine). Without
# it a fresh gateway priced a TP-2 engine as a warm one and chose it over one rank on both cores.
DEFAULT_CPU_TP_COLD_S = 2.2


@dataclass
class LatencySource:
    """Latency per (model, tp) for the planner. Per-iteration costs: the profile stored under
    `<state_dir>/profiles/` when one was measured, else on GPUs the committed operator-level model
    (`scheduler.gpu_profiles`), else the analytic roofline (`base`); that base corrected by the
    online calibration's `fits` (`scheduler.unserved.correction`). Load time: the engine start time
    this runtime measured for (model, tp, threads) when it has one (the truth on this machine), else
    the shape's profile's or GPU model's estimate, else DEFAULT_CPU_LOAD_S (one core per rank) or
    DEFAULT_CPU_SPAWN_LOAD_S. Loaded before planning (the
    profiler may have written a profile since), so the planner's thread does no I/O."""

    table: dict[tuple[str, int], LatencyModel]
    device: str
    start_times: dict[tuple[str, int, int], float]  # (model, tp, threads) -> seconds
    threaded: dict[tuple[str, int, int], LatencyModel] = field(default_factory=dict)
    # a fresh engine's one-off slowness after it is healthy (its first requests, and every token
    # count it runs for the first time), from the profile's served calibration; charged with the
    # start, since every (re)started engine pays it once
    cold: dict[tuple[str, int, int], float] = field(default_factory=dict)
    # start times here are those of starts in a spare engine process (runtime.engines.spares); what a
    # start without one costs more is the planner's (`PlanningProblem.spares`, `no_spare_s`)
    fits: Mapping[ShapeKey, ShapeFit] = field(default_factory=dict)  # online calibration
    caution: float = 0.0  # `UNSERVED_CAUTION` where the planner prices (`planning.plan_problem`)

    @classmethod
    def load(cls, state_dir: Path, pool: DevicePool, models: Iterable[str],
             start_times: dict[tuple[str, int, int], float],
             fits: Mapping[ShapeKey, ShapeFit] | None = None,
             caution: float = 0.0) -> "LatencySource":
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
        return cls(table, pool.signature, dict(start_times), threaded, cold, dict(fits or {}),
                   caution)

    def base(self, spec: ModelSpec, tp: int, threads: int = 1) -> tuple[LatencyModel, str]:
        """The shape's latency before online calibration, and its kind ("profile", "gpu-model",
        "roofline"; "..., threads assumed" for a threads shape without a profile)."""
        if threads > 1:
            hit = self.threaded.get((spec.name, tp, threads))
            if hit is not None:
                return hit, "profile"
            one, kind = self.base(spec, tp)
            return assumed_threads_latency(one, spec, tp, threads), f"{kind}, threads assumed"
        hit = self.table.get((spec.name, tp))
        if hit is not None:
            return hit, "profile"
        if self.device == "cpu":
            return analytic_latency_model(spec, tp, "cpu"), "roofline"
        for gpu in (self.device, "cuda"):  # a GPU kind without coefficients: the generic ones
            try:
                return gpu_latency_model(spec, tp, gpu), "gpu-model"
            except ValueError:
                continue
        return analytic_latency_model(spec, tp, "cuda"), "roofline"

    def correction(self, spec: ModelSpec, tp: int, threads: int = 1) -> Correction | None:
        return correction(self.fits, (spec.name, tp, threads, self.device),
                          self.base(spec, tp, threads)[1])

    def __call__(self, spec: ModelSpec, tp: int) -> LatencyModel:
        return self.threads(spec, tp, 1)

    def _start_s(self, spec: ModelSpec, tp: int, threads: int = 1) -> float:
        measured = self.start_times.get((spec.name, tp, threads))
        if measured is not None:
            return measured
        if self.device != "cpu":
            return self.base(spec, tp)[0].load_time_s
        # a CPU profile's start counts for its own shape only: one core per rank forks, more spawn
        own = self.table.get((spec.name, tp)) if threads == 1 else self.threaded.get(
            (spec.name, tp, threads))
        if own is not None and own.load_time_s > 0:
            return own.load_time_s
        return DEFAULT_CPU_LOAD_S if threads == 1 else DEFAULT_CPU_SPAWN_LOAD_S

    def threads(self, spec: ModelSpec, tp: int, threads: int) -> LatencyModel:
        """Ranks on `threads` cores each: that shape's profile, else the assumed speed-up over
        threads = 1, corrected by the online calibration. The start time is that shape's (one core
        per rank starts faster, `_start_s`), plus a fresh engine's one-off cost: the online
        calibration's for a shape it fitted, else the profile's (`_cold_s`). A shape neither served
        nor profiled, of a model that has one that was, is priced `caution` slower."""
        lat, _ = self.base(spec, tp, threads)
        fix = self.correction(spec, tp, threads)
        if fix is not None:
            lat = fix.apply(lat)
        if self._cautious(spec.name, tp, threads):
            lat = scale_latency(lat, 1.0 + self.caution, 1.0 + self.caution)
        cold = self._cold_s(spec.name, tp, threads, fix)
        return lat.with_load_time(self._start_s(spec, tp, threads) + cold)

    def _cold_s(self, model: str, tp: int, threads: int, fix: Correction | None) -> float:
        """A fresh engine's one-off slowness: as measured on served engines of the shape, else the
        profile's; a shape neither served nor profiled pays the most another model's engines paid
        at that shape (TP 2 engines here paid 2-3 s that TP 1 ones did not), else on CPU at TP > 1
        `DEFAULT_CPU_TP_COLD_S`, else nothing."""
        if fix is not None and fix.cold_s is not None:
            return fix.cold_s
        own = threads > 1 and (model, tp, threads) in self.threaded
        hit = self.cold.get((model, tp, threads if own else 1))
        if hit is not None:
            return hit
        peers = [f.cold_s for k, f in self.fits.items()
                 if k[0] != model and k[1:] == (tp, threads, self.device)]
        peers += [c for k, c in self.cold.items() if k[0] != model and k[1:] == (tp, threads)]
        if peers:
            return max(peers)
        return DEFAULT_CPU_TP_COLD_S if self.device == "cpu" and tp > 1 else 0.0

    def _cautious(self, model: str, tp: int, threads: int) -> bool:
        """Whether (model, tp, threads) is priced with `caution`: neither profiled nor served
        itself, while another shape of the model was."""
        if self.caution <= 0 or self._observed(model, tp, threads):
            return False
        shapes = {(m, t, 1) for m, t in self.table} | set(self.threaded) | {
            k[:3] for k in self.fits if k[3] == self.device}
        return any(k[0] == model for k in shapes)

    def _observed(self, model: str, tp: int, threads: int) -> bool:
        own = (model, tp) in self.table if threads == 1 else (model, tp, threads) in self.threaded
        return own or (model, tp, threads, self.device) in self.fits

    def source(self, spec: ModelSpec, tp: int, threads: int = 1) -> dict[str, Any]:
        """Where the shape's figures come from (`samullm plan`'s `latency_sources`)."""
        _, kind = self.base(spec, tp, threads)
        fix = self.correction(spec, tp, threads)
        out: dict[str, Any] = {"model": spec.name, "tp": tp, "threads": threads, "base": kind,
                               "source": kind if fix is None else
                               ("online calibration" if fix.source == "online" else "derived")}
        if fix is not None:
            out |= {"detail": fix.detail, "token_scale": round(fix.token_scale, 4),
                    "step_scale": round(fix.step_scale, 4)}
            hit = self.fits.get((spec.name, tp, threads, self.device))
            if fix.source == "online" and hit is not None:
                before, after = hit.replay_errors()
                out |= {"served": hit.served, "replay_err_before": round(before, 4),
                        "replay_err_after": round(after, 4), "fresh_engine_s": round(hit.cold_s, 3)}
        if self._cautious(spec.name, tp, threads):
            out["caution"] = self.caution
        out["start_s"] = round(self._start_s(spec, tp, threads), 3)
        out["start"] = "measured" if (spec.name, tp, threads) in self.start_times else (
            "profile" if kind == "profile" or self.device != "cpu" else "default")
        return out


def planner_shapes(specs: Mapping[str, ModelSpec], pool: DevicePool) -> list[tuple[str, int, int]]:
    """Every (model, tp, threads) the planner may give each of `specs` on `pool`, by model name."""
    width = max(len(g) for g in pool.topology_groups())
    return [(name, tp, th) for name, spec in sorted(specs.items())
            for tp in tp_degrees(pool) if spec.valid_tp(tp)
            for th in thread_counts(pool) if tp * th <= width]


def latency_sources(latency: LatencySource, specs: Mapping[str, ModelSpec],
                    pool: DevicePool) -> list[dict[str, Any]]:
    """`LatencySource.source` of every shape the planner may give each of `specs` on `pool`."""
    return [latency.source(specs[m], tp, th) for m, tp, th in planner_shapes(specs, pool)]


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
