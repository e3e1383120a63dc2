"""The status page's Gantt chart: one SVG of a batch's plan and of what actually ran, per device.

Input: the batch's events as `GET /v1/batches/{id}/events` gives them (`type`, `created_at`,
`data`). Each device is a row of two lanes: the upper one holds the planned stages of the latest
`plan`/`replan` event (a `schedule` list, every stage's `start_s`/`end_s` after the event and its
`plans`; events stored before plan events carried it name the first `stage` only, drawn from the
event up to the predicted makespan), the lower one each engine as it ran, from `engine_start` (starting,
pale) over `engine_started` (serving) to `engine_stop` / `engine_failed` / `engine_start_failed`
(or now). Pure: strings in, a string out; every text is escaped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import Any, Iterable

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
           "#9c755f", "#ff9da7", "#bab0ac")
WIDTH, LABEL_W, LANE_H, ROW_GAP, AXIS_H, LEGEND_H = 960, 70, 14, 8, 22, 26
PLAN_TYPES = ("plan", "replan")
ENGINE_END = {"engine_stop": "stopped", "engine_failed": "failed",
              "engine_start_failed": "failed to start"}
TICK_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)


@dataclass(frozen=True)
class Bar:
    """One bar on one device lane, in unix seconds."""

    lane: str  # "plan" | "ran"
    model: str
    devices: tuple[int, ...]
    start: float
    end: float
    phase: str = ""  # ran lane: "starting" | "serving"; plan lane: "stage N"
    note: str = ""  # tooltip detail


def event_time(ev: dict[str, Any]) -> float:
    """When it happened: the executor's own float time when the event kept it, else `created_at`."""
    t = (ev.get("data") or {}).get("time")
    return float(t) if isinstance(t, (int, float)) else float(ev.get("created_at") or 0)


def _devices(d: dict[str, Any]) -> tuple[int, ...]:
    return tuple(int(x) for x in d.get("devices") or () if isinstance(x, int))


def _plan_desc(p: dict[str, Any]) -> str:
    return f"TP {p.get('tp', 1)} × DP {p.get('dp', 1)}"


def planned_bars(events: list[dict[str, Any]]) -> list[Bar]:
    """The stages of the latest plan or re-plan, placed in time from when it was made."""
    plans = [e for e in events if e.get("type") in PLAN_TYPES]
    if not plans:
        return []
    ev = plans[-1]
    data, t = ev.get("data") or {}, event_time(ev)
    stages = data.get("schedule")
    of = ""
    if not isinstance(stages, list):  # the first stage only: drawn up to the predicted makespan
        makespan = float(data.get("predicted_makespan_s") or 0.0)
        stages = [{"start_s": 0.0, "end_s": makespan, "plans": data.get("stage") or []}]
        n = data.get("stages")
        of = f" of {n} (the event names the first only)" if isinstance(n, int) and n > 1 else ""
    out = []
    for i, st in enumerate(stages, 1):
        start, end = t + float(st.get("start_s", 0.0)), t + float(st.get("end_s", 0.0))
        for p in st.get("plans") or ():
            out.append(Bar("plan", str(p.get("model", "?")), _devices(p), start,
                           max(start, end), f"stage {i}{of}", _plan_desc(p)))
    return out


def engine_bars(events: list[dict[str, Any]], now: float) -> list[Bar]:
    """Each engine (slot) as it ran: starting until `engine_started`, then serving until it ends."""
    open_: dict[Any, tuple[dict[str, Any], float, float | None]] = {}
    out: list[Bar] = []

    def close(key: Any, end: float, why: str) -> None:
        d, began, up = open_.pop(key)
        model, devs = str(d.get("model", "?")), _devices(d)
        if up is None:
            out.append(Bar("ran", model, devs, began, end, "starting", why))
        else:
            out.append(Bar("ran", model, devs, began, up, "starting", ""))
            out.append(Bar("ran", model, devs, up, end, "serving", why))

    first = min((event_time(e) for e in events), default=now)
    for ev in events:
        kind, d, t = ev.get("type"), ev.get("data") or {}, event_time(ev)
        key = d.get("slot", (d.get("model"), tuple(d.get("devices") or ())))
        if kind == "engine_start":
            if key in open_:
                close(key, t, "restarted")
            open_[key] = (d, t, None)
        elif kind == "engine_started":
            got = open_.get(key)
            open_[key] = (got[0], got[1], t) if got else (d, first, t)
        elif kind in ENGINE_END:
            if key not in open_:  # started before this batch's events began (a warm engine)
                open_[key] = (d, first, first)
            close(key, t, ENGINE_END[kind])
    for key in list(open_):
        close(key, max(now, open_[key][1]), "running")
    return out


def _tick_step(span: float) -> int:
    return next((s for s in TICK_STEPS if span / s <= 8), TICK_STEPS[-1])


def _rel(s: float) -> str:
    s = int(round(s))
    if s < 120:
        return f"+{s}s"
    return f"+{s // 60}m" if s < 7200 else f"+{s // 3600}h{s % 3600 // 60:02d}"


def gantt_svg(events: list[dict[str, Any]], *, start: float, now: float, live: bool) -> str:
    """The chart from `start` (the batch's creation) to the later of now and the plan's end."""
    bars = planned_bars(events) + engine_bars(events, now)
    if not bars:
        return '<p class="empty">No plan yet.</p>'
    devices = sorted({d for b in bars for d in b.devices})
    models = sorted({b.model for b in bars})
    color = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(models)}
    end = max([now if live else start] + [b.end for b in bars])
    span = max(10.0, end - start)
    plot_w = WIDTH - LABEL_W - 10

    def x(t: float) -> float:
        return round(LABEL_W + plot_w * (min(max(t, start), start + span) - start) / span, 1)

    row_h = 2 * LANE_H + ROW_GAP
    height = AXIS_H + row_h * len(devices) + LEGEND_H
    parts = [f'<svg class="gantt" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} '
             f'{height}" width="100%" role="img" aria-label="plan and engines per device">']
    step = _tick_step(span)
    for k in range(int(math.floor(span / step)) + 1):
        tx = x(start + k * step)
        parts.append(f'<line class="tick" x1="{tx}" x2="{tx}" y1="{AXIS_H - 4}" '
                     f'y2="{AXIS_H + row_h * len(devices)}"/>')
        if tx < WIDTH - 40:  # no label cut off at the right edge
            parts.append(f'<text class="axis" x="{tx}" y="{AXIS_H - 8}">{_rel(k * step)}</text>')
    for i, dev in enumerate(devices):
        y = AXIS_H + i * row_h
        parts.append(f'<text class="dev" x="4" y="{y + LANE_H - 2}">dev {dev} plan</text>'
                     f'<text class="dev" x="4" y="{y + 2 * LANE_H - 2}">ran</text>')
    for b in bars:
        for dev in b.devices:
            y = AXIS_H + devices.index(dev) * row_h + (LANE_H if b.lane == "ran" else 0)
            x0, x1 = x(b.start), x(b.end)
            w = max(1.0, round(x1 - x0, 1))
            cls = f"bar {b.lane} {b.phase}".strip()
            tip = escape(f"{b.model} {b.phase} {b.note} ({_rel(b.start - start)} → "
                         f"{_rel(b.end - start)})".replace("  ", " "))
            parts.append(f'<g class="{escape(cls)}" data-model="{escape(b.model)}">'
                         f'<title>{tip}</title><rect x="{x0}" y="{y + 1}" width="{w}" '
                         f'height="{LANE_H - 2}" fill="{color[b.model]}"/>')
            if w > 7 * len(b.model) + 6:
                parts.append(f'<text class="label" x="{x0 + 3}" y="{y + LANE_H - 4}">'
                             f'{escape(b.model)}</text>')
            parts.append("</g>")
    if live:
        nx = x(now)
        parts.append(f'<line class="now" x1="{nx}" x2="{nx}" y1="{AXIS_H - 4}" '
                     f'y2="{AXIS_H + row_h * len(devices)}"><title>now</title></line>')
    parts.append(_legend(models, color, AXIS_H + row_h * len(devices) + 16))
    parts.append("</svg>")
    return "".join(parts)


def _legend(models: Iterable[str], color: dict[str, str], y: float) -> str:
    out, lx = [], LABEL_W
    for m in models:
        out.append(f'<rect x="{lx}" y="{y - 9}" width="10" height="10" fill="{color[m]}"/>'
                   f'<text class="legend" x="{lx + 14}" y="{y}">{escape(m)}</text>')
        lx += 24 + 7 * len(m)
    out.append(f'<text class="legend" x="{lx + 10}" y="{y}">upper lane: planned stages · lower '
               "lane: engines (pale: starting)</text>")
    return "".join(out)
