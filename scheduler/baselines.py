"""The competitors SamuLLM is compared with, as choosers for `scheduler.stages.run_policy`.

All use the same cost model (simulator + latency + load time) and the same stage mechanics, so the
makespans are comparable. Each chooser returns the shapes of the next stage; engines whose shape is
unchanged are kept (no restart) by the placement.

- `sequential`: one model at a time on its best plan with up to all devices (one vLLM server per
  model, or `vllm run-batch` per model, by hand). Running models first, then largest first.
- `even-split`: all models at once, the devices split evenly, one engine (dp = 1) each; largest
  models first get the remainder; a model that needs more than its share (memory) takes its minimum,
  models that do not fit wait for the next stage. Re-split whenever a model finishes.
- `per-model-best`: each model's individually best plan, chosen once on the initial work (the paper's
  "naive" plan generation), then stages packed greedily (running first, then largest first).
- `muxserve-greedy`: largest model first, each takes the plan with the highest throughput (useful
  FLOPs / finish time) among those that still leave room for the smallest plan of every model after
  it (MuxServe's placement, without GPU sharing, which our engines do not do).

Dependent requests: every baseline takes the models in topological order (`Context.order` is
`Dag.order`: an upstream model before its downstream ones; ties as without dependencies), and those
that pick models one by one (`sequential`, `per-model-best`) take the ones that wait for no other
model first, so a model is never run alone while all it could do waits elsewhere. `level-by-level`
(each topological level as a job of its own) is the planner's (`scheduler.planner`).
"""

from __future__ import annotations

from scheduler.stages import Context, Option, PlanState
from scheduler.placement import Shape, shape_devices, unpack


def _order(ctx: Context, state: PlanState) -> list[str]:
    """Unfinished models: running ones first (keeping them avoids a restart), then largest first
    (with dependencies: topological, those waiting for another model last)."""
    todo = [m for m in ctx.order if m in state.work]
    out = [m for m in todo if m in state.running] + [m for m in todo if m not in state.running]
    if ctx.dag is None:
        return out
    waiting = ctx.waiting(state)
    # then those with released requests (in a cycle of the model graph none is ready)
    return sorted(out, key=lambda m: (not waiting.ready(m), waiting.released.get(m, 0.0) <= 0))


def sequential(ctx: Context, state: PlanState) -> list[Shape]:
    m = _order(ctx, state)[0]
    best = ctx.best(state, m, ctx.pool.count)
    assert best is not None
    return [best.shape]


def _min_devices(ctx: Context, m: str) -> int:
    return min(shape_devices(s) for s in ctx.shapes(m))


def even_split(ctx: Context, state: PlanState) -> list[Shape]:
    todo = [m for m in ctx.order if m in state.work]
    # who runs: largest first, as long as each one's minimum still fits
    free, chosen = ctx.pool.count, []
    for m in todo:
        need = _min_devices(ctx, m)
        if need <= free:
            chosen.append(m)
            free -= need
    share, extra = divmod(ctx.pool.count, len(chosen))
    out: list[Shape] = []
    left = ctx.pool.count
    for i, m in enumerate(chosen):
        budget = share + (1 if i < extra else 0)
        reserve = sum(_min_devices(ctx, x) for x in chosen[i + 1:])
        budget = min(max(budget, _min_devices(ctx, m)), left - reserve)
        # one engine of one core per rank each (the usual manual split; no threads shapes)
        ones = [unpack(s)[1] for s in ctx.shapes(m) if len(s) == 3 and s[2] == 1]
        tps = [tp for tp in ones if tp <= budget]
        tp = max(tps) if tps else min(ones)
        out.append((m, tp, 1))
        left -= tp
    return out


def per_model_best() -> "PerModelBest":
    return PerModelBest()


class PerModelBest:
    """Stateful chooser: the per-model best plans are fixed on the first call (initial work)."""

    def __init__(self) -> None:
        self.best: dict[str, Shape] = {}

    def __call__(self, ctx: Context, state: PlanState) -> list[Shape]:
        for m in ctx.order:
            if m in state.work and m not in self.best:
                opt = ctx.best(state, m, ctx.pool.count)
                assert opt is not None
                self.best[m] = opt.shape
        free, out = ctx.pool.count, []
        for m in _order(ctx, state):
            need = shape_devices(self.best[m])
            if need <= free:
                out.append(self.best[m])
                free -= need
        return out


def _throughput(opt: Option) -> float:
    return opt.run.work_done(opt.run.total_s) / opt.finish_s if opt.finish_s > 0 else 0.0


def muxserve_greedy(ctx: Context, state: PlanState) -> list[Shape]:
    todo = [m for m in ctx.order if m in state.work]
    free, out = ctx.pool.count, []
    for i, m in enumerate(todo):
        # leave room for the smallest plan of as many later models as can fit at all
        reserve, room = 0, free - _min_devices(ctx, m)
        for x in todo[i + 1:]:
            need = _min_devices(ctx, x)
            if reserve + need <= room:
                reserve += need
        opts = ctx.best_per_count(state, m, free - reserve)
        if not opts:
            continue
        best = max(opts, key=lambda o: (_throughput(o), -o.devices))
        out.append(best.shape)
        free -= best.devices
    return out
