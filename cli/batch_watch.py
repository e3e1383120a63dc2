"""`samullm batch watch`: a batch's progress in the terminal until it ends, polled through the SDK.

One tqdm bar for the batch with the planner's ETA (`estimated_completion_at`, from the latest plan)
and one bar per model (`model_request_counts`, our extension of the Batch object) with tqdm's own
rate-based estimate; the plans and engine events (`GET /v1/batches/{id}/events`, paged forward from
the last one seen) are printed above the bars as they come.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import openai
from tqdm import tqdm

TERMINAL = ("completed", "failed", "expired", "cancelled")
BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"


def _eta(at: Any, now: float) -> str:
    if not isinstance(at, (int, float)):
        return "planning"
    left = max(0, int(at - now))
    clock = time.strftime("%H:%M:%S", time.localtime(at))
    return f"planned done {clock} (in {left // 3600}h{left % 3600 // 60:02d}m{left % 60:02d}s)" \
        if left >= 3600 else f"planned done {clock} (in {left // 60}m{left % 60:02d}s)"


def describe(event: dict[str, Any]) -> str:
    """One line for an event: its time, type and what matters of it."""
    d = event.get("data") or {}
    when = time.strftime("%H:%M:%S", time.localtime(event.get("created_at") or 0))
    kind = event.get("type", "?")
    if kind in ("plan", "replan"):
        stage = ", ".join(f"{s.get('model')} tp{s.get('tp')}x{s.get('dp', 1)}"
                          for s in d.get("stage") or [] if isinstance(s, dict))
        extra = f"stage [{stage}] of {d.get('stages')}, makespan " \
                f"{float(d.get('predicted_makespan_s') or 0):.1f}s"
        if "predicted_completion_s" in d:
            extra += f", this batch {float(d['predicted_completion_s']):.1f}s"
        if d.get("reasons"):
            extra += f" ({', '.join(map(str, d['reasons']))})"
    else:
        extra = " ".join(f"{k}={d[k]}" for k in ("model", "tp", "devices", "why", "requests",
                                                  "late_s", "message") if k in d)
    return f"{when} {kind} {extra}".rstrip()


class Bars:
    """The batch bar and a bar per model, created as models appear."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.bars: dict[str, tqdm] = {}

    def _bar(self, key: str, label: str, total: int) -> tqdm:
        bar = self.bars.get(key)
        if bar is None:
            bar = self.bars[key] = tqdm(total=total, desc=label, position=len(self.bars),
                                        unit="req", file=self.out, bar_format=BAR,
                                        dynamic_ncols=True, leave=True)
        return bar

    def show(self, key: str, label: str, counts: dict[str, Any], postfix: str) -> None:
        bar = self._bar(key, label, int(counts.get("total") or 0))
        bar.total = int(counts.get("total") or 0)
        bar.set_description_str(label, refresh=False)
        done = int(counts.get("completed") or 0) + int(counts.get("failed") or 0)
        if done > bar.n:
            bar.update(done - bar.n)
        bar.set_postfix_str(postfix, refresh=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def watch(client: openai.OpenAI, batch_id: str, interval: float = 1.0, *, events: bool = True,
          out: TextIO | None = None) -> Any:
    """Poll the batch until it ends; returns its final Batch object."""
    out = out or sys.stderr
    bars, after = Bars(out), None
    try:
        while True:
            b = client.batches.retrieve(batch_id)
            extra = b.model_extra or {}
            if events:
                after = _print_events(client, batch_id, after, out)
            rc = b.request_counts
            total = {"total": rc.total, "completed": rc.completed, "failed": rc.failed} \
                if rc else {}
            bars.show("", f"{batch_id[:18]} {b.status}", total,
                      _eta(extra.get("estimated_completion_at"), time.time())
                      if b.status not in TERMINAL else b.status)
            for model, counts in sorted((extra.get("model_request_counts") or {}).items()):
                bars.show(f"m:{model}", f"  {model}", counts, f"failed {counts.get('failed', 0)}")
            if b.status in TERMINAL:
                break
            time.sleep(interval)
    finally:
        bars.close()
    files = ", ".join(f"{k} {v}" for k, v in (("output", b.output_file_id),
                                             ("errors", b.error_file_id)) if v)
    errors = "; ".join(e.message or "" for e in (b.errors.data or [])) if b.errors else ""
    print(f"batch {b.id} {b.status}: {rc.completed if rc else 0} completed, "
          f"{rc.failed if rc else 0} failed" + (f"; {files}" if files else "") +
          (f"; {errors}" if errors else ""), file=out, flush=True)
    return b


def _print_events(client: openai.OpenAI, batch_id: str, after: str | None, out: TextIO
                  ) -> str | None:
    """Print the events after `after`; returns the last id printed."""
    while True:
        params: dict[str, Any] = {"limit": 100} | ({"after": after} if after else {})
        page: Any = client.get(f"/batches/{batch_id}/events", cast_to=object,
                               options={"params": params})
        for event in page.get("data") or []:
            tqdm.write(describe(event), file=out)
            after = event.get("id") or after
        if not page.get("has_more"):
            return after
