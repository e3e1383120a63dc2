"""Output-length draws and multi-sample makespan estimates.

Output lengths are unknown before running, so the planner works on sampled ones. One draw gives one
makespan; the makespan is not linear in the lengths (PAPER.md §2.1), so an average length is not a
substitute. We plan on one draw and then replay the resulting schedule on S independent draws
(`makespan_stats`), which gives the expected makespan of *that schedule* and its spread.

Pure: the length model is passed in (`scheduler.lengths.LengthModel` or anything with its `sample`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from scheduler.dag import resolve_prompts
from scheduler.estimator import Workload
from scheduler.replay import replay
from scheduler.types import Schedule, SimRequest


class LengthSampler(Protocol):
    def sample(self, model: str, endpoint: str, caps: np.ndarray,
               rng: np.random.Generator) -> np.ndarray: ...


@dataclass(frozen=True)
class RequestShape:
    """A request before its output length is drawn: prompt length, output cap, tokens already out;
    `upstream` and `arrival_s` as in `SimRequest` (the prompt is its own tokens: the planner adds
    the upstream requests' drawn outputs)."""

    rid: int
    prompt_len: int
    cap: int  # max_tokens, already limited to max_model_len - prompt_len by the caller
    endpoint: str = "/v1/chat/completions"
    generated: int = 0
    upstream: tuple[tuple[str, int], ...] = ()
    arrival_s: float = 0.0
    prefix: tuple[int, ...] = ()  # as `SimRequest.prefix`


def sample_workloads(shapes: dict[str, Sequence[RequestShape]], lengths: LengthSampler,
                     samples: int = 1, seed: int = 0) -> list[dict[str, list[SimRequest]]]:
    """`samples` independent draws of every request's output length (draw s uses the generator
    seeded with (seed, s), models in name order, so draws are reproducible and independent of each
    other). A request that already produced `generated` tokens gets at least generated + 1 (it has not
    finished yet), never more than its cap; embeddings produce one "token" (their forward pass)."""
    out = []
    for s in range(samples):
        rng = np.random.default_rng([seed, s])
        draw: dict[str, list[SimRequest]] = {}
        for model in sorted(shapes):
            reqs = list(shapes[model])
            by_ep: dict[str, list[int]] = {}
            for i, r in enumerate(reqs):
                by_ep.setdefault(r.endpoint, []).append(i)
            lens = np.ones(len(reqs), dtype=np.int64)
            for ep in sorted(by_ep):
                idx = by_ep[ep]
                if ep.endswith("embeddings"):
                    continue
                caps = np.array([max(1, reqs[i].cap) for i in idx], dtype=np.int64)
                lens[idx] = np.asarray(lengths.sample(model, ep, caps, rng), dtype=np.int64)
            draw[model] = [
                SimRequest(r.rid, r.prompt_len,
                           int(min(max(1, r.cap), max(int(n), r.generated + 1))), r.generated,
                           r.arrival_s, r.upstream, r.prefix)
                for r, n in zip(reqs, lens)]
        out.append(draw)
    return out


@dataclass(frozen=True)
class MakespanStats:
    mean_s: float
    std_s: float
    min_s: float
    max_s: float
    samples: int

    def to_dict(self) -> dict[str, float | int]:
        return {"mean_s": self.mean_s, "std_s": self.std_s, "min_s": self.min_s,
                "max_s": self.max_s, "samples": self.samples}


def makespan_stats(planner, schedule: Schedule,
                   draws: Sequence[dict[str, list[SimRequest]]]) -> MakespanStats:
    """Replay `schedule` (planned by `planner`, a `scheduler.planner.Planner`) on each draw of the
    work. Each draw replaces `output_len` of the same requests (dependent prompts resolved with the
    draw's upstream outputs, as the planner does); the running engines are the planner's
    problem's."""
    ctx, problem = planner.exact_ctx, planner.problem
    vals = []
    for draw in draws:
        work = {m: Workload.of(reqs)
                for m, reqs in sorted(resolve_prompts(draw, problem.models).items())}
        vals.append(replay(ctx, planner.state_for(work), schedule).t)
    arr = np.asarray(vals, dtype=float)
    if not len(arr):
        return MakespanStats(schedule.makespan_s, 0.0, schedule.makespan_s, schedule.makespan_s, 0)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return MakespanStats(float(arr.mean()), std if math.isfinite(std) else 0.0,
                         float(arr.min()), float(arr.max()), len(arr))

