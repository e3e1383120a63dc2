"""The status page's HTML fragments: the list of a key's batches and one batch's page.

Both take the API's own objects (the Batch objects of `BatchService.view`, the events of
`GET /v1/batches/{id}/events`) and return HTML that the page's script puts in place. Pure; every
text that came from a user or an engine is escaped. Times are `<time data-unix>` elements that the
script shows in the browser's time zone (UTC until it does).
"""

from __future__ import annotations

import time
from html import escape
from typing import Any

from gateway import lifecycle as lc
from gateway.ui_svg import event_time, gantt_svg

TIMELINE_MAX = 300  # newest events shown on a batch page
SKIP_KEYS = frozenset({"time", "message", "stage", "schedule", "running", "remaining", "reasons"})


def _ts(unix: float | None) -> str:
    if not unix:
        return "—"
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))
    return (f'<time datetime="{iso}" data-unix="{int(unix)}">'
            f'{time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix))}</time>')


def _dur(s: float) -> str:
    s = max(0, int(round(s)))
    if s < 90:
        return f"{s}s"
    if s < 5400:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def eta(batch: dict[str, Any], now: float) -> str:
    at = batch.get("estimated_completion_at")
    if batch["status"] in lc.TERMINAL:
        ended = max((batch.get(k) or 0) for k in lc.STAMP.values())
        return f'ended {_ts(ended)}' if ended else "ended"
    if not at:
        return '<span class="muted">no plan yet</span>'
    left = at - now
    return (f'<span class="eta">in {_dur(left)}</span> ({_ts(at)})' if left > 0
            else f'<span class="eta late">due {_dur(-left)} ago</span>')


def _bar(completed: int, failed: int, total: int, label: str = "") -> str:
    ok = 100.0 * completed / total if total else 0.0
    bad = 100.0 * failed / total if total else 0.0
    return (f'<div class="progress" role="progressbar" aria-valuemin="0" aria-valuemax="{total}" '
            f'aria-valuenow="{completed + failed}" data-completed="{completed}" '
            f'data-failed="{failed}" data-total="{total}">'
            f'<span class="ok" style="width:{ok:.1f}%"></span>'
            f'<span class="fail" style="width:{bad:.1f}%"></span></div>'
            f'<span class="count">{label}{completed + failed}/{total}'
            f'{f" ({failed} failed)" if failed else ""}</span>')


def _counts_bar(c: dict[str, Any]) -> str:
    return _bar(int(c.get("completed", 0)), int(c.get("failed", 0)), int(c.get("total", 0)))


def progress(batch: dict[str, Any]) -> str:
    """One bar per model (`model_request_counts`), or the batch's counts before it has them."""
    per_model = batch.get("model_request_counts") or {}
    if not per_model:
        c = batch.get("request_counts") or {}
        return f'<div class="model">{_counts_bar(c)}</div>'
    return "".join(
        f'<div class="model" data-model="{escape(m)}"><span class="name">{escape(m)}</span>'
        f'{_counts_bar(c)}</div>' for m, c in sorted(per_model.items()))


def _status(status: str) -> str:
    return f'<span class="status {escape(status)}">{escape(status.replace("_", " "))}</span>'


def batch_list(batches: list[dict[str, Any]], now: float, more: bool) -> str:
    if not batches:
        return ('<p class="empty">No batches for this key yet. Upload a file and create a batch '
                'with the OpenAI SDK (<code>client.batches.create(...)</code>).</p>')
    rows = "".join(
        f'<tr class="batch" data-batch="{escape(b["id"])}" data-status="{escape(b["status"])}">'
        f'<td><a href="#{escape(b["id"])}">{escape(b["id"])}</a></td>'
        f'<td>{_status(b["status"])}</td>'
        f'<td>{_ts(b["created_at"])}</td><td class="bars">{progress(b)}</td>'
        f'<td>{eta(b, now)}</td></tr>' for b in batches)
    note = '<p class="muted">The latest batches are shown.</p>' if more else ""
    return ('<table class="batches"><thead><tr><th>Batch</th><th>Status</th><th>Created</th>'
            f'<th>Progress per model</th><th>Completion</th></tr></thead><tbody>{rows}</tbody>'
            f'</table>{note}')


def _file(label: str, file_id: str | None, batch_id: str) -> str:
    if not file_id:
        return ""
    name = f"{batch_id}_{label}.jsonl"
    return (f'<a class="download" href="#" data-file="{escape(file_id)}" '
            f'data-name="{escape(name)}">{escape(label)} file</a> ')


def _plans(stage: Any) -> str:
    return ", ".join(f'{escape(str(p.get("model")))} TP{p.get("tp", 1)}×DP{p.get("dp", 1)} on '
                     f'{escape(str(p.get("devices")))}' for p in stage or () if isinstance(p, dict))


def summary(ev: dict[str, Any]) -> str:
    """One line of what an event says (escaped HTML)."""
    d = ev.get("data") or {}
    parts = []
    if ev.get("type") in ("plan", "replan"):
        parts.append(f"{d.get('stages', '?')} stage(s), makespan "
                     f"{_dur(float(d.get('predicted_makespan_s') or 0))}")
        if isinstance(d.get("predicted_completion_s"), (int, float)):
            parts.append(f"this batch done in {_dur(d['predicted_completion_s'])}")
        if d.get("reasons"):
            parts.append("because " + ", ".join(str(r) for r in d["reasons"][:6]))
        first = f"; first stage: {_plans(d['stage'])}" if d.get("stage") else ""
        return escape("; ".join(parts)) + first
    if "model" in d:
        parts.append(f"{d['model']} on devices {d['devices']}" if "devices" in d else str(d["model"]))
    parts += [f"{k}={v}" for k, v in d.items()
              if k not in SKIP_KEYS and k not in ("model", "devices")
              and isinstance(v, (str, int, float, bool)) and v is not None]
    text = escape(", ".join(parts))
    if d.get("message"):
        text += f'<div class="message">{escape(str(d["message"])[-500:])}</div>'
    return text


def timeline(events: list[dict[str, Any]], start: float) -> str:
    shown = events[-TIMELINE_MAX:][::-1]
    items = "".join(
        f'<li class="ev {escape(str(e.get("type")))}" data-type="{escape(str(e.get("type")))}">'
        f'<span class="when">+{_dur(event_time(e) - start)}</span>'
        f'<span class="type">{escape(str(e.get("type")))}</span>'
        f'<span class="what">{summary(e)}</span></li>' for e in shown)
    more = (f'<p class="muted">The newest {TIMELINE_MAX} of {len(events)} events.</p>'
            if len(events) > TIMELINE_MAX else "")
    if not items:
        return '<p class="empty">No events yet.</p>'
    return f'<ol class="timeline">{items}</ol>{more}'


def batch_page(b: dict[str, Any], events: list[dict[str, Any]], now: float) -> str:
    live = b["status"] not in lc.TERMINAL
    errors = (b.get("errors") or {}).get("data") or []
    err_html = "".join(f'<li>line {escape(str(e.get("line")))}: {escape(str(e.get("code")))} — '
                       f'{escape(str(e.get("message")))}</li>' for e in errors[:50])
    files = "".join(_file(kind, b.get(f"{kind}_file_id"), b["id"])
                    for kind in ("input", "output", "error"))
    return (
        f'<section class="batch-page" data-batch="{escape(b["id"])}" '
        f'data-status="{escape(b["status"])}">'
        f'<p><a href="#">← all batches</a></p>'
        f'<h2>{escape(b["id"])} {_status(b["status"])}</h2>'
        f'<dl><dt>Endpoint</dt><dd>{escape(b["endpoint"])}</dd>'
        f'<dt>Created</dt><dd>{_ts(b["created_at"])}</dd>'
        f'<dt>Completion</dt><dd>{eta(b, now)}</dd>'
        f'<dt>Files</dt><dd class="files">{files or "—"}</dd></dl>'
        + (f'<ul class="errors">{err_html}</ul>' if err_html else "")
        + f'<h3>Progress per model</h3><div class="bars">{progress(b)}</div>'
        f'<h3>Plan and engines</h3>'
        f'{gantt_svg(events, start=float(b["created_at"]), now=now, live=live)}'
        f'<h3>Events</h3>{timeline(events, float(b["created_at"]))}</section>')
