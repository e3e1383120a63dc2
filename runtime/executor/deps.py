"""Dependent requests of one batch (its `depends_on` lines): who waits for whom, and what happens
when an upstream request ends.

A request with upstream requests in the batch is WAITING until every one of them has a durable
successful outcome; it is then released (queued) with each upstream's generated text put in its
placeholders (`runtime.placeholders.substitute`, applied when it is sent). Upstream results come
only from durable outcomes, so a dependent never runs on an output that a crash could make run again
differently. When an upstream request fails, the dependent is not run: it gets a `dependency_failed`
outcome naming that upstream, which in turn fails its own dependents, level by level.

After a restart the gateway hands the journaled outcomes the pending requests depend on (`known`),
so upstream outputs come from the journal and nothing journaled runs again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from runtime.executor.pool_state import Req
from runtime.executor_api import Outcome
from runtime.placeholders import generated_text
from runtime.usage import usage_of

DEPENDENCY_FAILED = "dependency_failed"


def upstream_failure(custom_id: str, outcome: Outcome | None) -> str:
    """The message of a dependent's `dependency_failed` error."""
    if outcome is None:
        return f"its dependency {custom_id!r} has no result"
    why = (outcome.error or {}).get("code") or outcome.status_code
    return f"its dependency {custom_id!r} did not complete successfully ({why})"


def output_tokens(outcome: Outcome) -> int:
    n = usage_of(outcome.response_body).output
    return n if n else 0


@dataclass
class Released:
    """What one durable outcome changed: dependents now runnable, and dependents that must fail
    (with the upstream id to name)."""

    ready: list[Req] = field(default_factory=list)
    failed: list[tuple[Req, str]] = field(default_factory=list)


class BatchGraph:
    """The dependency graph of one batch's pending requests."""

    def __init__(self, reqs: Sequence[Req], known: Mapping[str, Outcome] | None = None) -> None:
        known = known or {}
        by_id = {r.item.custom_id: r for r in reqs}
        self._dependents: dict[str, list[Req]] = {}
        self._waiting: dict[Req, set[str]] = {}
        self.doomed: list[tuple[Req, str]] = []  # upstream already failed (journaled) at submit
        for r in reqs:
            if not r.item.depends_on:
                continue
            waiting: set[str] = set()
            failed_by = None
            for up in r.item.depends_on:
                if up in by_id:
                    waiting.add(up)
                    self._dependents.setdefault(up, []).append(r)
                    continue
                o = known.get(up)
                if o is None or not o.ok:
                    failed_by = failed_by or up
                    continue
                # one endpoint per batch: the upstream answered on the dependent's url
                r.inputs[up] = generated_text(o.response_body, r.item.url) or ""
                r.known_tokens += output_tokens(o)
            if failed_by is not None:
                self.doomed.append((r, upstream_failure(failed_by, known.get(failed_by))))
            elif waiting:
                self._waiting[r] = waiting
                r.wait()

    def finished(self, req: Req, outcome: Outcome) -> Released:
        """`req`'s outcome is durable: release or fail the dependents it completes."""
        out = Released()
        cid = req.item.custom_id
        text = generated_text(outcome.response_body, req.item.url) if outcome.ok else None
        for d in self._dependents.pop(cid, ()):
            waiting = self._waiting.get(d)
            if waiting is None:  # already failed through another upstream, or cancelled
                continue
            if not outcome.ok:
                del self._waiting[d]
                out.failed.append((d, upstream_failure(cid, outcome)))
                continue
            d.inputs[cid] = text or ""
            d.known_tokens += output_tokens(outcome)
            waiting.discard(cid)
            if not waiting:
                del self._waiting[d]
                out.ready.append(d)
        return out

    def forget(self, req: Req) -> None:
        """`req` will not run (cancelled): it waits for nothing any more."""
        self._waiting.pop(req, None)

