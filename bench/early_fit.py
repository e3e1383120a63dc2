"""How well the online calibration's first fits predict the rest of an engine's run.

Reads the state dirs `bench.fairness --mix` leaves for the big batch alone
(`<root>/runs/state-mix-big-alone-*`): on each, one `medium` engine (the `--model`) served its
300 requests from its start to its end, and `calibration.json` holds every answer. For each run
and each `--at` time (seconds after its first send), the window as a refit then saw it is fitted
two ways, and the whole run replayed under each fit:
- before: the answers by then only, with the weak pull toward equal scales a roofline gets
  (the calibration up to 6 Dec 2026);
- now: with the requests in flight then (`scheduler.served.Pending`, to their output caps) and
  the pull over a profile that the code has (`scheduler.online.PROFILE_EQUAL_WEIGHT`).
Printed per run, then per time the median, least and most of (replayed rest of the run) /
(measured rest), the rest being what came after the last answer fitted: 1.00 is exact.

    .venv/bin/python -m bench.early_fit [--root .samullm/bench-makespan] [--at 6,10,15]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runtime.config import load_config  # noqa: E402
from runtime.executor.latency_source import LatencySource  # noqa: E402
from runtime.executor.planning import engine_limits, kv_bytes_fn, model_specs  # noqa: E402
from runtime.persist import load_calibration  # noqa: E402
from scheduler import online  # noqa: E402
from scheduler.calibration import scale_latency  # noqa: E402
from scheduler.served import Pending, Run, ShapeWindow, busy_periods  # noqa: E402
from scheduler.simulator import simulate  # noqa: E402
from scheduler.types import DevicePool  # noqa: E402


@contextlib.contextmanager
def weak_pull() -> Iterator[None]:
    """The fit as it was: a profile's split pulled toward equal scales as weakly as a roofline's."""
    kept = online.PROFILE_EQUAL_WEIGHT
    online.PROFILE_EQUAL_WEIGHT = online.EQUAL_WEIGHT
    try:
        yield
    finally:
        online.PROFILE_EQUAL_WEIGHT = kept


def rest_ratios(state: Path, cfg_path: Path, model: str, at: list[float]
                ) -> dict[float, tuple[float, float]] | None:
    """Per time: (before, now) replayed rest over measured rest; None without such a run."""
    cfg = load_config(cfg_path)
    pool = DevicePool("cpu", (0, 1), int(cfg.devices.cpu_kvcache_gib * 2**30))
    specs = model_specs(cfg, "cpu")
    log, _ = load_calibration(state, 100_000)
    window = log.snapshot().get((model, 1, 1, pool.signature))
    if window is None or len(window.runs) != 1:
        return None
    run = window.runs[0]
    base, kind = LatencySource.load(state, pool, [model], {}).base(specs[model], 1, 1)
    limits = engine_limits(specs[model], 1, kv_bytes_fn(cfg, pool))
    (whole,) = busy_periods(Run(run.served))
    t0 = run.served[0].sent_s
    out = {}
    for t in at:
        answered = tuple(s for s in run.served if s.done_s - t0 <= t)
        k = len(answered) - 1
        rest = whole.measured[-1] - whole.measured[k] if answered else 0.0
        if len(answered) < online.MIN_SERVED or rest <= 0:
            continue
        flying = tuple(Pending(s.queued_s, s.sent_s, s.prompt_tokens, s.output_tokens)
                       for s in run.served if s.sent_s - t0 <= t < s.done_s - t0)
        pair = []
        for pending, ctx in (((), weak_pull()), (flying, contextlib.nullcontext())):
            with ctx:
                fit = online.fit_shape(base, kind, limits, ShapeWindow(
                    (Run(answered, pending=pending),), len(answered)))
            if fit is None:
                break
            fin = sorted(simulate(whole.requests, limits, scale_latency(
                base, fit.token_scale, fit.step_scale)).finish_times_s.values())
            pair.append((fin[-1] - fin[k]) / rest)
        if len(pair) == 2:
            out[t] = (pair[0], pair[1])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=REPO / ".samullm" / "bench-makespan")
    ap.add_argument("--model", default="medium")
    ap.add_argument("--at", default="6,10,15", help="seconds after the engine's first send")
    args = ap.parse_args(argv)
    at = [float(x) for x in args.at.split(",")]
    cfg = args.root / "mix-alone.toml"
    states = sorted((args.root / "runs").glob("state-mix-big-alone-*"))
    if not cfg.exists() or not states:
        print(f"no big-alone runs under {args.root}: run `python -m bench.fairness --mix-only`")
        return 1
    per_t: dict[float, list[tuple[float, float]]] = {t: [] for t in at}
    print("| run | " + " | ".join(f"{t:g} s: before / now" for t in at) + " |")
    print("|---|" + "---:|" * len(at))
    for state in states:
        got = rest_ratios(state, cfg, args.model, at)
        if not got:
            continue
        for t, pair in got.items():
            per_t[t].append(pair)
        print(f"| {state.name.rsplit('-', 1)[-1]} | " + " | ".join(
            f"{got[t][0]:.2f} / {got[t][1]:.2f}" if t in got else "–" for t in at) + " |")
    print(f"\n{args.model}: replayed rest of the run / measured rest, from its answers by each "
          "time (median, least–most)")
    print("| after | runs | before | now |\n|---:|---:|---:|---:|")
    for t, pairs in per_t.items():
        if not pairs:
            continue
        cells = []
        for i in (0, 1):
            v = [p[i] for p in pairs]
            cells.append(f"{statistics.median(v):.2f}× ({min(v):.2f}–{max(v):.2f})")
        print(f"| {t:g} s | {len(pairs)} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
