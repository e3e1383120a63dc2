"""Large workloads read off a fitted line instead of simulated request by request: the
estimator's shortcut for models with more than `Estimator.exact_limit` requests left (see
`fitted_line` for why a line holds)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from scheduler.runs import PlanRun, Workload, useful_flops
from scheduler.simulator import simulate

if TYPE_CHECKING:
    from scheduler.estimator import Estimator


def extrapolates(est: "Estimator", model: str, work: Workload) -> bool:
    """Whether runs of `work` are read off the fitted line (`fitted_line`) instead of simulated.

    Not with same-model dependencies, and not when the prefix cache has prefixes to replay: a
    request's hits depend on which other requests share its blocks and how recently they ran,
    which an evenly spaced subsample changes (a group of 10 requests sharing a document keeps
    about one member in 20: no hits at all), while sampling whole groups fails for the common
    case of one system prompt over all requests (one group). Exact simulation is correct and
    costs ~0.2 s per 10,000 requests and (tp, dp)."""
    if len(work) <= est.exact_limit or est._deps(model, work) is not None:
        return False
    if not est.models[model].prefix_caching:
        return True
    if "prefixes" not in work._cache:
        work._cache["prefixes"] = any(r.prefix for r in work.requests)
    return not work._cache["prefixes"]



def fitted_line(est: "Estimator", model: str, tp: int, work: Workload) -> tuple[float, float, PlanRun]:
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
    hit = est._lines.get(key)
    if hit is not None:
        return hit
    spec, lat, lim = est.models[model], est.latency(model, tp), est.limits(model, tp)
    n, m2 = len(work), min(len(work), est.line_sample)
    idx = (np.arange(m2) * n) // m2
    sub2 = [work.requests[i] for i in idx]
    sub1 = sub2[::2]
    r2 = simulate(sub2, lim, lat, kv_trace=True)
    r1 = simulate(sub1, lim, lat)
    est._count[0] += 2
    m1 = len(sub1)
    b = (r2.total_time_s - r1.total_time_s) / (m2 - m1) if m2 > m1 else 0.0
    if b <= 0:
        b = r2.total_time_s / m2
    a = r2.total_time_s - b * m2
    by_rid = {r.rid: useful_flops(spec, r) for r in sub2}
    fin = np.array(sorted(r2.finish_times_s.values()), dtype=float)
    order = sorted(r2.finish_times_s, key=lambda rid: r2.finish_times_s[rid])
    cum = np.cumsum([by_rid[rid] for rid in order])
    times, used, running = r2.kv_trace
    kv = [(np.asarray(times), np.asarray(used) * lim.block_size, np.asarray(running))]
    out = (a, b, PlanRun(r2.total_time_s, fin, cum, kv=kv))
    est._lines[key] = out
    return out



def extrapolated_run(est: "Estimator", model: str, tp: int, dp: int, work: Workload) -> PlanRun:
    """A dp-replica run of a large workload: every replica is a share of it (round-robin, or
    contiguous when it has prefixes the cache ignores: `split_replicas`) of at most ceil(n/dp)
    requests, so its time is T(ceil(n/dp)) on the fitted line; the finish curve is the
    subsample's, stretched to that time and scaled to the workload's total useful FLOPs; every
    replica holds as much KV over time as the subsample's run did."""
    a, b, sample = fitted_line(est, model, tp, work)
    total = a + b * -(-len(work) // dp)
    work_total = est.work_total(model, work)
    scale_t = total / sample.total_s if sample.total_s > 0 else 1.0
    scale_w = work_total / sample.total_work if sample.total_work > 0 else 1.0
    (times, used, running), = sample.kv
    return PlanRun(total, sample.finish_sorted * scale_t, sample.work_cum * scale_w,
                   kv=[(times * scale_t, used, running)] * dp)
