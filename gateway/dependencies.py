"""The `depends_on` rules of a batch input file that need the whole file: unknown ids, placeholders
of requests a line does not list, cycles. `gateway.validation` checks each line's own rules while it
streams the file, then asks these for the lines with dependencies."""

from __future__ import annotations

from typing import Container, Iterator

from runtime.executor_api import WorkItem
from runtime.placeholders import placeholder_ids


def shown_id(value: str) -> str:
    """A string for an error message, cut short (errors.data keeps up to 100 messages)."""
    return repr(value) if len(value) <= 80 else repr(value[:80]) + "..."


def dependency_errors(dependent: list[WorkItem], recheck: list[WorkItem], seen: Container[str],
                      endpoint: str, need: str) -> list[tuple[int, str, str, str]]:
    """The `depends_on` rules that need every custom_id (`seen`), as (line, code, message, param)
    in line order. `dependent`: the valid items with `depends_on`; `recheck`: those whose prompt
    holds a placeholder of an id they do not list (read back: bodies are not kept). A line that
    failed its own rules is not followed as a dependency (its error fails the batch already)."""
    errors = []
    for it in dependent:
        if unknown := [d for d in it.depends_on if d not in seen]:
            errors.append((it.line, "unknown_dependency", f"`depends_on` names {_ids(unknown)}: no "
                           "request of this batch has that custom_id.", "depends_on"))
    for it in recheck:  # read again: rare (a literal `{{...}}`), and bodies are not kept
        found = placeholder_ids(it.body, endpoint)
        if unlisted := list(dict.fromkeys(x for x in found if x in seen
                                          and x not in it.depends_on)):
            errors.append((it.line, "undeclared_dependency", "The prompt holds the placeholder "
                           f"of {_ids(unlisted)}, a request of this batch not in `depends_on`: "
                           "list it there to have its output put in.", f"body.{need}"))
    for cycle in _cycles(dependent):
        steps = [f"{shown_id(it.custom_id)} (line {it.line})" for it in cycle[:5]]
        steps += [f"... ({len(cycle)} requests in all)"] if cycle[5:] else []
        errors.append((cycle[0].line, "dependency_cycle", "`depends_on` makes a cycle, so none of "
                       f"its requests can run: {' -> '.join(steps)} -> back to the first (each "
                       "depends on the next).", "depends_on"))
    return sorted(errors, key=lambda e: e[0])


def _cycles(items: list[WorkItem]) -> Iterator[list[WorkItem]]:
    """Disjoint cycles among `items` (those with `depends_on`, in line order), each from its first
    line; an item on a cycle is on one of them or depends on one. Iterative, linear in the edges."""
    where = {it.custom_id: i for i, it in enumerate(items)}
    deps = [[where[d] for d in it.depends_on if d in where] for it in items]
    users: dict[int, list[int]] = {}  # item -> the items that depend on it
    for i, ds in enumerate(deps):
        for d in ds:
            users.setdefault(d, []).append(i)
    # peel off what could run, as the executor would release it: what is left waits on a cycle
    waiting = [len(ds) for ds in deps]
    ready = [i for i, w in enumerate(waiting) if not w]
    for d in ready:  # grows while read
        for i in users.get(d, ()):
            waiting[i] -= 1
            if not waiting[i]:
                ready.append(i)
    walk_of: dict[int, int] = {}  # an item left -> the first walk that reached it
    for start in (i for i, w in enumerate(waiting) if w):
        path, v = [], start
        while v not in walk_of:  # every item left has a dependency left: a walk comes round
            walk_of[v] = start
            path.append(v)
            v = next(d for d in deps[v] if waiting[d])
        if walk_of[v] == start:  # else it met an earlier walk, whose cycle is reported
            cycle = path[path.index(v):]
            first = cycle.index(min(cycle))
            yield [items[i] for i in cycle[first:] + cycle[:first]]


def _ids(ids: list[str]) -> str:
    return ", ".join(shown_id(x) for x in ids[:3]) + (f" and {len(ids) - 3} more" if ids[3:] else "")
