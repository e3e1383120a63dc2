"""Gantt charts of schedules: one row per device, one bar per engine run, labelled by model and TP.

An engine run is a plan kept across consecutive stages (no restart); it is drawn on each of its
devices from the stage it started in to the stage it stopped after. Several schedules go in one
figure, one panel each, on a shared time axis. A stage in which a model waits for another's outputs
(dependent requests, `Stage.waits_on`) is marked on that model's bar with "waits on ...". matplotlib (Agg backend, no display); the format
follows the file name's extension (.png, .svg, .pdf).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scheduler.types import DevicePool, ExecPlan, Schedule


@dataclass(frozen=True)
class EngineRun:
    plan: ExecPlan
    start_s: float
    end_s: float


def engine_runs(schedule: Schedule) -> list[EngineRun]:
    """Merge the stages a plan stays unchanged in into one run per engine."""
    open_runs: dict[str, EngineRun] = {}
    out: list[EngineRun] = []
    for st in schedule.stages:
        seen = set()
        for p in st.plans:
            seen.add(p.model)
            cur = open_runs.get(p.model)
            if cur is not None and cur.plan.same_shape(p) and p.model not in st.restarts:
                open_runs[p.model] = EngineRun(p, cur.start_s, st.end_s)
            else:
                if cur is not None:
                    out.append(cur)
                open_runs[p.model] = EngineRun(p, st.start_s, st.end_s)
        for m in [m for m in open_runs if m not in seen or m in st.finished]:
            out.append(open_runs.pop(m))
    out.extend(open_runs.values())
    return sorted(out, key=lambda r: (r.start_s, r.plan.model))


def stage_waits(schedule: Schedule) -> list[tuple[float, ExecPlan, list[str]]]:
    """(stage start, the waiting model's plan in that stage, the models it waits on), per stage and
    model of `Stage.waits_on` that runs in the stage."""
    out = []
    for st in schedule.stages:
        for p in st.plans:
            ups = st.waits_on.get(p.model)
            if ups:
                out.append((st.start_s, p, list(ups)))
    return out


def write_gantt(schedules: dict[str, Schedule], pool: DevicePool, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    names = list(schedules)
    models = sorted({p.model for s in schedules.values() for st in s.stages for p in st.plans})
    cmap = plt.get_cmap("tab20" if len(models) > 10 else "tab10")
    color = {m: cmap(i % cmap.N) for i, m in enumerate(models)}
    ids = list(pool.ids)
    row = {d: i for i, d in enumerate(ids)}
    horizon = max((s.makespan_s for s in schedules.values()), default=1.0) or 1.0
    fig, axes = plt.subplots(len(names), 1, squeeze=False, sharex=True,
                             figsize=(12, 0.9 + 0.42 * len(ids) * len(names) + 0.3 * len(names)))
    for ax, name in zip(axes[:, 0], names):
        s = schedules[name]
        for run in engine_runs(s):
            width = run.end_s - run.start_s
            for d in run.plan.devices:
                ax.barh(row[d], width, left=run.start_s, height=0.8, color=color[run.plan.model],
                        edgecolor="black", linewidth=0.4)
                if width > horizon * 0.04:
                    ax.text(run.start_s + width / 2, row[d],
                            f"{run.plan.model} TP{run.plan.tp}"
                            + (f"×{run.plan.threads}t" if run.plan.threads > 1 else ""),
                            ha="center", va="center",
                            fontsize=7, clip_on=True)
        for st in s.stages:
            ax.axvline(st.end_s, color="grey", linewidth=0.5, linestyle=":")
        for start, plan, ups in stage_waits(s):
            ax.annotate(f"waits on {', '.join(ups)}", (start, row[plan.devices[0]] - 0.42),
                        fontsize=6, va="top", ha="left", color="dimgrey", clip_on=True)
        origin = f" (stages of {s.origin[9:]})" if s.origin.startswith("baseline:") else ""
        ax.set_title(f"{name}{origin}: makespan {s.makespan_s:,.0f} s", fontsize=9, loc="left")
        ax.set_yticks(range(len(ids)), [f"{pool.kind}{d}" for d in ids], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, horizon * 1.01)
    axes[-1, 0].set_xlabel("predicted time (s)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=color[m]) for m in models]
    fig.legend(handles, models, loc="upper right", fontsize=7, ncol=max(1, len(models) // 6))
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=path.suffix.lstrip(".").lower() or "png", dpi=120)
    plt.close(fig)
    return path
