"""Dependent requests: the DAG across models that `SimRequest.upstream` describes.

A request lists the requests (model, rid) whose outputs its prompt includes (an ensemble's fuser
request waits for every generator's answer to its question; a chain's chunk i for chunk i - 1 on the
same model; a judge request for one answer). Only *pending* upstream requests count: those in the
planning problem's work; any other id finished already and is ignored. For planning:

- prompts: a request's `prompt_len` holds its own tokens; its upstream requests' sampled outputs
  (the same draw) are added, capped so prompt + output fit the model's context (`resolve_prompts`,
  the one place this happens: the planner and the replays on other draws both call it);
- release: a request is not admitted before its last upstream request finished (the simulator's
  `depends` within one run, arrivals across runs: `scheduler.pipeline`);
- levels: 0 without pending upstream, else 1 + the highest level among them (the `level-by-level`
  baseline runs each level as a job of its own: `split_levels`);
- model order: upstream models before their downstream ones (ties, and models in a cycle of the
  model graph, in the given order); a model may depend on itself (a chain).

Pure; built once per planning problem (the structure does not change with the length draw).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from scheduler.types import ModelSpec, SimRequest

Key = tuple[str, int]  # (model, rid): a request's global id


def dependent(work: Mapping[str, Sequence[SimRequest]]) -> bool:
    """Whether any request names upstream requests or arrives later (else planning needs no DAG)."""
    return any(r.upstream or r.arrival_s > 0 for reqs in work.values() for r in reqs)


def resolve_prompts(work: Mapping[str, Sequence[SimRequest]],
                    models: Mapping[str, ModelSpec]) -> dict[str, list[SimRequest]]:
    """`work` with every prompt grown by the `output_len` of its upstream requests in `work`,
    capped at max_model_len − output_len (never below the request's own tokens). Work without
    upstream requests comes back as it is."""
    if not any(r.upstream for reqs in work.values() for r in reqs):
        return {m: list(reqs) for m, reqs in work.items()}
    out_len = {(m, r.rid): r.output_len for m, reqs in work.items() for r in reqs}
    out: dict[str, list[SimRequest]] = {}
    for m, reqs in work.items():
        spec = models.get(m)
        new = []
        for r in reqs:
            add = sum(out_len.get(u, 0) for u in set(r.upstream) if u != (m, r.rid))
            if add:
                cap = r.prompt_len + add if spec is None else max(
                    r.prompt_len, spec.max_model_len - r.output_len)
                r = dataclasses.replace(r, prompt_len=min(r.prompt_len + add, cap))
            new.append(r)
        out[m] = new
    return out


def same_model_deps(model: str, requests: Sequence[SimRequest]) -> dict[int, list[int]] | None:
    """rid -> rids among `requests` (all of `model`) it waits for: one engine run's `depends`."""
    rids = {r.rid for r in requests}
    deps = {}
    for r in requests:
        ups = [u for m, u in r.upstream if m == model and u in rids and u != r.rid]
        if ups:
            deps[r.rid] = ups
    return deps or None


def replica_parts(requests: Sequence[SimRequest], deps: Mapping[int, Sequence[int]],
                  dp: int) -> list[list[int]]:
    """Indices of `requests` (sorted by rid) per DP replica when some wait for others of the same
    model: requests linked by `deps` stay on one replica (a chain's next chunk is released by the
    engine that produced the previous one, and one simulation cannot release into another), each
    group going to the replica with the fewest requests so far. Without links this is the
    round-robin split of `Workload.split`."""
    pos = {r.rid: i for i, r in enumerate(requests)}
    root = list(range(len(requests)))

    def find(i: int) -> int:
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i

    for rid, ups in deps.items():
        for u in ups:
            if rid in pos and u in pos:
                a, b = find(pos[rid]), find(pos[u])
                root[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(len(requests)):
        groups.setdefault(find(i), []).append(i)
    parts: list[list[int]] = [[] for _ in range(dp)]
    for g in groups.values():  # in order of their first request
        min(parts, key=len).extend(g)
    return [sorted(p) for p in parts]


def split_replicas(reqs: Sequence[SimRequest], dp: int, deps: Mapping[int, Sequence[int]] | None
                   ) -> list[tuple[Sequence[SimRequest], Sequence[int]]]:
    """(requests, their indices) per DP replica (`Workload.split` is this with no `deps`):

    - round-robin in the given (rid) order;
    - when some request has a `prefix`: `dp` contiguous runs of that order, of counts differing by
      at most one (prefix affinity: the runtime's queue is ordered by prefix and its replicas take
      from its ends, so requests sharing a prefix run on one replica and hit its cache; round-robin
      would spread each group over every replica);
    - with `deps`: linked requests on one replica (`replica_parts`), prefixes or not."""
    if deps is None:
        if any(r.prefix for r in reqs):
            n = len(reqs)
            cuts = [-(-r * n // dp) for r in range(dp + 1)]  # round-robin's counts
            return [(reqs[a:b], range(a, b)) for a, b in zip(cuts, cuts[1:])]
        return [(reqs[r::dp], range(r, len(reqs), dp)) for r in range(dp)]
    return [([reqs[i] for i in idx], idx) for idx in replica_parts(reqs, deps, dp)]


@dataclass(frozen=True)
class Waiting:
    """Who waits for whom at one planning state (pending requests only)."""

    up: dict[str, frozenset[str]]  # model -> other models its requests wait for directly
    closure: dict[str, frozenset[str]]  # ... or through other requests (a cycle includes itself)
    released: dict[str, float]  # model -> fraction of its requests that wait for no other model

    def ready(self, model: str) -> bool:
        """Nothing of `model` waits for another model: it can run alone and finish."""
        return not self.up.get(model)

    def can_finish(self, model: str, models: frozenset[str] | set[str]) -> bool:
        """Every model `model` waits for, directly or not, is among `models` (a stage's)."""
        return self.closure.get(model, frozenset()) <= models


class Dag:
    """The pending requests' dependencies, their levels and the models' topological order."""

    def __init__(self, work: Mapping[str, Sequence[SimRequest]], order: Sequence[str]) -> None:
        pending = {(m, r.rid) for m, reqs in work.items() for r in reqs
                   if r.output_len > r.generated}
        self.up: dict[Key, tuple[Key, ...]] = {}
        for m, reqs in work.items():
            for r in reqs:
                ups = tuple(sorted({u for u in r.upstream if u in pending and u != (m, r.rid)}))
                if ups and (m, r.rid) in pending:
                    self.up[(m, r.rid)] = ups
        self.arrivals = any(r.arrival_s > 0 for reqs in work.values() for r in reqs)
        # whether planning needs the dependent-work path at all (else: the planner's fast path)
        self.active = bool(self.up) or self.arrivals
        self.same_model = any(u[0] == k[0] for k, ups in self.up.items() for u in ups)
        self.topo = self._topological(pending)
        self.rank = {k: i for i, k in enumerate(self.topo)}  # position in `topo`
        self.level: dict[Key, int] = {}
        for k in self.topo:
            self.level[k] = 1 + max((self.level[u] for u in self.up.get(k, ())), default=-1)
        edges = {(u[0], k[0]) for k, ups in self.up.items() for u in ups if u[0] != k[0]}
        self.order = _model_order(edges, list(order) + sorted(set(work) - set(order)))

    def _topological(self, pending: set[Key]) -> list[Key]:
        down: dict[Key, list[Key]] = {}
        count = dict.fromkeys(pending, 0)
        for k, ups in self.up.items():
            count[k] = len(ups)
            for u in ups:
                down.setdefault(u, []).append(k)
        queue = deque(sorted(k for k, c in count.items() if c == 0))
        out = []
        while queue:
            k = queue.popleft()
            out.append(k)
            for d in down.get(k, ()):
                count[d] -= 1
                if count[d] == 0:
                    queue.append(d)
        if len(out) < len(pending):
            stuck = min(k for k, c in count.items() if c > 0)
            raise ValueError(f"requests wait for each other (a dependency cycle through {stuck})")
        return out

    def waiting(self, pending: Mapping[str, Iterable[int]]) -> Waiting:
        """Who waits for whom among the `pending` rids per model."""
        live = {(m, rid) for m, rids in pending.items() for rid in rids}
        up: dict[str, set[str]] = {m: set() for m in pending}
        waits_other: dict[Key, bool] = {}
        for k in self.topo:
            if k not in live:
                continue
            w = False
            for u in self.up.get(k, ()):
                if u in live:
                    if u[0] != k[0]:
                        up[k[0]].add(u[0])
                        w = True
                    elif waits_other.get(u):
                        w = True
            waits_other[k] = w
        closure = {m: _reach(m, up) for m in up}
        released = {}
        for m, rids in pending.items():
            rids = list(rids)
            held = sum(1 for rid in rids if waits_other.get((m, rid)))
            released[m] = 1.0 - held / len(rids) if rids else 1.0
        return Waiting({m: frozenset(s) for m, s in up.items()}, closure, released)

    def split_levels(self, work: Mapping[str, Sequence[SimRequest]]
                     ) -> list[dict[str, list[SimRequest]]]:
        """`work` (prompts resolved) as one job per level, in level order: each level's requests
        without upstream (finished by then) and all arriving at the level's start."""
        out: list[dict[str, list[SimRequest]]] = []
        for m in sorted(work):
            for r in work[m]:
                lv = self.level.get((m, r.rid), 0)
                while len(out) <= lv:
                    out.append({})
                out[lv].setdefault(m, []).append(dataclasses.replace(r, upstream=(), arrival_s=0.0))
        return out


def _reach(model: str, up: Mapping[str, set[str]]) -> frozenset[str]:
    seen: set[str] = set()
    todo = list(up.get(model, ()))
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(up.get(m, ()))
    return frozenset(seen)


def _model_order(edges: set[tuple[str, str]], order: list[str]) -> list[str]:
    """Kahn's algorithm over the model graph, ties in `order`; in a cycle, the first of `order`."""
    rank = {m: i for i, m in enumerate(order)}
    indeg = dict.fromkeys(order, 0)
    succ: dict[str, set[str]] = {m: set() for m in order}
    for u, d in edges:
        if u in succ and d in indeg and d not in succ[u]:
            succ[u].add(d)
            indeg[d] += 1
    out: list[str] = []
    left = set(order)
    while left:
        ready = [m for m in left if indeg[m] == 0]
        m = min(ready or left, key=rank.__getitem__)
        out.append(m)
        left.discard(m)
        for d in succ[m]:
            indeg[d] -= 1
    return out
