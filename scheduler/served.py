"""What the engines served, kept for the online calibration (`scheduler.online`).

An observation (`Served`) is one answered request: when it entered its model's queue, when it was
sent, when its answer came (on one clock, the executor's), its prompt and output tokens (the
answer's `usage`). `ServedLog` keeps `window` of them per engine shape, (model, tp, threads,
device kind) = `ShapeKey`, grouped per engine run: of each run its start (a fresh engine, which a
replay reproduces exactly) and its newest requests. `busy_periods` cuts a run where its engine had
nothing in flight, the unit a fit replays. A snapshot may carry the requests in flight (`Pending`):
replayed, never matched, never stored. Pure: no I/O, no clock (times are given).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Mapping, Sequence

from scheduler.types import SimRequest

ShapeKey = tuple[str, int, int, str]  # (model, tp, threads per rank, device kind)
DEFAULT_WINDOW = 512  # served requests kept per shape: a fit replays ~ms per 100 of them


@dataclass(frozen=True)
class Served:
    """One answered request, times in seconds on one clock (the executor's)."""

    queued_s: float  # entered its model's queue (the earliest it could have been sent)
    sent_s: float
    done_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Pending:
    """A request in flight when the window was taken: no answer yet, but it held a seat (or a place
    in the engine's queue) and its prefill ran beside the answered ones."""

    queued_s: float
    sent_s: float
    prompt_tokens: int
    max_tokens: int  # its output cap: it is replayed to it, past every answer matched


@dataclass(frozen=True)
class Run:
    """Served requests of one engine, by send time, that a replay may start from empty."""

    served: tuple[Served, ...]
    # its start was dropped from the window: its first requests queued behind dropped ones
    trimmed: bool = False
    # requests sent from then on were dropped from the window: answers after it are not matched
    end_s: float | None = None
    # requests in flight on its engine when the window was taken (`ServedLog.snapshot`): never
    # kept or saved, only replayed
    pending: tuple[Pending, ...] = ()


@dataclass(frozen=True)
class ShapeWindow:
    runs: tuple[Run, ...]
    seen: int  # requests ever observed for the shape (a fit records it: stale when it moved)


@dataclass(frozen=True)
class Period:
    """Requests one engine served back to back: arrivals and sorted answer times from its start.
    The answers matched are measured[skip:upto]."""

    requests: tuple[SimRequest, ...]
    measured: tuple[float, ...]
    skip: int = 0  # leading answers queued behind requests dropped from the window
    upto: int | None = None  # None: all; else the answers before requests dropped were sent
    fresh: bool = False  # the first period of a fresh engine (it pays one-off costs)
    pending: tuple[int, ...] = ()  # rids of requests in flight at the snapshot: not matched


# --- the window ------------------------------------------------------------------------------
def _sent(s: Served | Pending) -> float:
    return s.sent_s


class _Buf:
    """One engine's requests in the window: its first `head` ones (a fresh engine's start, which
    a replay reproduces exactly and which tells per-token from per-step costs best) and, after
    `cut_s` once requests were dropped, the newest ones."""

    def __init__(self, served: Iterable[Served] = (), cut_s: float | None = None,
                 end_s: float | None = None) -> None:
        self.served = sorted(served, key=_sent)
        self.cut_s = cut_s
        # requests of the engine aborted from then on (`ServedLog.interrupt`): answers after it
        # are not matched
        self.end_s = end_s

    def drop(self, n: int, head: int) -> int:
        """Drop up to n of the oldest requests after the head; returns how many went."""
        at = head if self.cut_s is None else bisect.bisect_left(self.served, self.cut_s, key=_sent)
        gone = self.served[at:at + n]
        if gone and self.cut_s is None:
            self.cut_s = gone[0].sent_s
        del self.served[at:at + n]
        return len(gone)

    def runs(self) -> list[Run]:
        if self.cut_s is None:
            return [Run(tuple(self.served), end_s=self.end_s)] if self.served else []
        at = bisect.bisect_left(self.served, self.cut_s, key=_sent)
        head, tail = tuple(self.served[:at]), tuple(self.served[at:])
        head_end = self.cut_s if self.end_s is None else min(self.cut_s, self.end_s)
        return ([Run(head, end_s=head_end)] if head else []) + (
            [Run(tail, trimmed=True, end_s=self.end_s)] if tail else [])


class ServedLog:
    """Per shape, `window` served requests, grouped per engine run (`run`: any id the caller keeps
    for one engine, e.g. its slot): of each run its first window/4 and its newest. When over,
    the oldest run loses the requests after its head first, then its head."""

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        self.window = max(1, window)
        self.head = max(1, self.window // 4)
        self._runs: dict[ShapeKey, list[_Buf]] = {}
        self._open: dict[tuple[ShapeKey, Hashable], _Buf] = {}
        self._seen: dict[ShapeKey, int] = {}
        self.version = 0  # bumped by every observation

    @classmethod
    def from_windows(cls, windows: Mapping[ShapeKey, ShapeWindow],
                     window: int = DEFAULT_WINDOW) -> "ServedLog":
        """A log holding stored windows (their runs are closed: new engines add runs of their own)."""
        log = cls(window)
        for key, w in windows.items():
            log._runs[key] = [_Buf(r.served, -math.inf if r.trimmed else r.end_s, r.end_s)
                              for r in w.runs if r.served]
            log._seen[key] = w.seen
            log._trim(key)
        return log

    def add(self, key: ShapeKey, run: Hashable, served: Served) -> None:
        runs = self._runs.setdefault(key, [])
        buf = self._open.get((key, run))
        if buf is None:
            buf = self._open[(key, run)] = _Buf()
        if all(b is not buf for b in runs):  # new, or dropped whole
            runs.append(buf)
        bisect.insort(buf.served, served, key=_sent)
        self._seen[key] = self._seen.get(key, 0) + 1
        self.version += 1
        self._trim(key)

    def interrupt(self, key: ShapeKey, run: Hashable, since_s: float) -> None:
        """Requests of `run` in flight were aborted, the first of them sent at `since_s`: its
        engine did work no answer records from then on. Its answers after `since_s` are not
        matched, and what it serves next is a run of its own whose first requests queued behind
        that work (as behind requests dropped from the window: `Run.trimmed`)."""
        buf = self._open.get((key, run))
        if buf is not None:
            buf.end_s = since_s if buf.end_s is None else min(buf.end_s, since_s)
        self._open[(key, run)] = _Buf(cut_s=-math.inf)

    def _trim(self, key: ShapeKey) -> None:
        runs = self._runs[key]
        extra = sum(len(b.served) for b in runs) - self.window
        while extra > 0 and runs:
            extra -= runs[0].drop(extra, self.head)
            if extra > 0:  # nothing but its head left: the whole run goes
                extra -= len(runs.pop(0).served)

    def snapshot(self, pending: Mapping[tuple[ShapeKey, Hashable], Sequence[Pending]] | None = None
                 ) -> dict[ShapeKey, ShapeWindow]:
        """An immutable copy (a fit may run in another thread while requests are added). With
        `pending`, the requests in flight per (shape, run) go with that run's newest requests:
        without them a replay of its last answers lacks the requests that shared their steps (a
        wave's prefill, 0.7 s on `medium`, read as a 5x slower step: 6 Dec 2026)."""
        open_of = {id(b): k for k, b in self._open.items()}  # buf -> its (shape, run)
        out = {}
        for key, bufs in self._runs.items():
            runs: list[Run] = []
            for b in bufs:
                mine = b.runs()
                more = (pending or {}).get(open_of.get(id(b)), ()) if mine else ()
                if more:  # in flight behind its newest run's start (a trimmed one's: its tail)
                    t0 = mine[-1].served[0].sent_s
                    mine[-1] = dataclasses.replace(mine[-1], pending=tuple(sorted(
                        (q for q in more if q.sent_s >= t0), key=lambda q: q.sent_s)))
                runs += mine
            out[key] = ShapeWindow(tuple(runs), self._seen.get(key, 0))
        return out


def run_to_dict(run: Run) -> dict[str, Any]:
    """JSON-able, times from the run's first send (µs)."""
    t0 = run.served[0].sent_s
    return {"trimmed": run.trimmed, "end_s": None if run.end_s is None else round(run.end_s - t0, 6),
            "served": [[round(s.queued_s - t0, 6), round(s.sent_s - t0, 6), round(s.done_s - t0, 6),
                        s.prompt_tokens, s.output_tokens] for s in run.served]}


def run_from_dict(d: dict[str, Any]) -> Run:
    """The inverse of `run_to_dict`; raises KeyError/TypeError/ValueError on bad data."""
    run = Run(tuple(Served(float(q), float(a), float(b), int(p), int(o))
                    for q, a, b, p, o in d["served"]), bool(d["trimmed"]),
              None if d.get("end_s") is None else float(d["end_s"]))
    if not all(math.isfinite(x) for v in run.served for x in (v.queued_s, v.sent_s, v.done_s)):
        raise ValueError("served times must be numbers")
    return run


def busy_periods(run: Run) -> list[Period]:
    """The run cut where its engine had nothing in flight; arrivals and answers from each start.
    Its pending requests are replayed (to their output cap) and never matched."""
    groups: list[list[Served | Pending]] = []
    end = -math.inf
    for s in sorted((*run.served, *run.pending), key=_sent):
        if not groups or s.sent_s >= end:
            groups.append([])
        groups[-1].append(s)
        end = max(end, s.done_s if isinstance(s, Served) else math.inf)
    out = []
    for i, g in enumerate(groups):
        t0 = g[0].sent_s
        reqs = tuple(SimRequest(j, max(1, s.prompt_tokens), max(1, _output(s)),
                                arrival_s=min(max(0.0, s.queued_s - t0), s.sent_s - t0))
                     for j, s in enumerate(g))
        answered = [s for s in g if isinstance(s, Served)]
        if not answered:
            continue
        skip = 0
        if i == 0 and run.trimmed:
            first = min(s.done_s for s in answered)
            skip = sum(s.sent_s < first for s in answered)
        done = sorted(s.done_s for s in answered)
        upto = None if run.end_s is None else bisect.bisect_right(done, run.end_s)
        out.append(Period(reqs, tuple(d - t0 for d in done), skip, upto,
                          i == 0 and not run.trimmed,
                          tuple(j for j, s in enumerate(g) if isinstance(s, Pending))))
    return out


def _output(s: Served | Pending) -> int:
    return s.output_tokens if isinstance(s, Served) else s.max_tokens
