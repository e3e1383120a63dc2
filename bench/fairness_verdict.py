"""The fairness bench's judgement (`bench.fairness`): a batch's time inside the gateway, whether
its model's engine was serving when it came, the small batches' own work against the big batch's
alone run, each repeat's verdicts against the issue's targets, and the tables that print them."""

from __future__ import annotations

import statistics

BIG_LIMIT = 1.05  # the big batch at most 5 % slower than alone (the targets)
POOL_LIMIT = 1.03  # the pool's makespan at most 3 % worse than in arrival order


def inside_s(events: list[dict], batch_id: str) -> float | None:
    """A batch's time inside the gateway: from its `batch_submitted` event to its
    `batch_finished` one (the client's polls add up to a poll interval at each end, as much as a
    20-request batch on a warm engine takes)."""
    at = {e["event"]: e["t"] for e in events if e.get("batches") == [batch_id]
          and e["event"] in ("batch_submitted", "batch_finished")}
    if len(at) < 2:
        return None
    return at["batch_finished"] - at["batch_submitted"]


def engine_up(events: list[dict], model: str, at_wall: float) -> bool:
    """Whether the gateway had an engine of `model` serving at unix time `at_wall` (its
    engine_started or engine_wake before, and no stop, failure or sleep of that slot in between).
    An engine asleep is not serving: a batch that wakes it as a guest (`engine_guest`) found its
    model not running, and is allowed one start, which its wake-up stands for."""
    up: set[int] = set()
    for e in sorted(events, key=lambda e: e["t"]):
        if e["t"] > at_wall:
            break
        if e.get("model") != model:
            continue
        if e["event"] in ("engine_started", "engine_wake"):
            up.add(e["slot"])
        elif e["event"] in ("engine_stop", "engine_failed", "engine_sleep"):
            up.discard(e["slot"])
    return bool(up)


def engine_cores(events: list[dict]) -> dict[str, set[int]]:
    """Per model, the cores its engines ran on (every `engine_started`'s devices)."""
    cores: dict[str, set[int]] = {}
    for e in events:
        if e["event"] == "engine_started":
            cores.setdefault(e["model"], set()).update(e.get("devices", ()))
    return cores


def small_work(out: dict) -> float | None:
    """The small batches' own work as a share of what the big batch's alone run had: the sum of
    each one's time inside the gateway alone times its model's cores there, over all the cores
    times the big batch's alone time. A gateway that gives the small batches their work and
    keeps every core busy finishes the big batch about that much later than alone, unless the
    alone run left cores idle (its engine starts, a tail on one core) for that work to fill: with
    the small batches served, 1 + this is about the best the big batch's ratio can be then.
    None when the alone runs did not say."""
    alone = out["alone"]
    inside, cores, total = alone.get("inside_s", {}), alone.get("cores"), alone.get("big_cores")
    if not cores or not total:
        return None
    work = 0.0
    for sb in out["smalls"]:
        t, c = inside.get(sb["name"]), cores.get(sb["model"])
        if t is None or c is None:
            return None
        work += t * c
    return work / (total * alone["big_s"])


def judged(out: dict) -> dict:
    """One repeat's verdicts: per small batch its target and whether it was met (a batch whose
    model's engine was up is judged inside the gateway, see `inside_s`), the big batch's and
    the pool's ratios."""
    alone, allow = out["alone"]["small"], out["alone"]["start_allowance_s"]
    inside = out["alone"].get("inside_s", {})
    small: dict[str, dict] = {}
    for sb in out["smalls"]:
        n = sb["name"]
        fair = out["fair"]["small"][n]
        target = 2 * alone[n] + (0.0 if fair["model_up"] else allow[sb["model"]])
        met = fair["s"] <= target
        if fair["model_up"] and fair.get("inside_s") is not None and inside.get(n) is not None:
            target, met = 2 * inside[n], fair["inside_s"] <= 2 * inside[n]
        small[n] = {"target_s": target, "met": met}
    big = {name: out[name]["big_s"] / out["alone"]["big_s"] for name in ("fair", "fifo")}
    work = small_work(out)
    return {"small": small, "small_met": sum(v["met"] for v in small.values()), "big": big,
            "pool": out["fair"]["makespan_s"] / out["fifo"]["makespan_s"],
            "small_work": work, "big_with_work": big_with_work(big["fair"], work),
            "met": all(v["met"] for v in small.values()) and big["fair"] <= BIG_LIMIT
            and out["fair"]["makespan_s"] <= POOL_LIMIT * out["fifo"]["makespan_s"]}


def big_with_work(ratio: float, work: float | None) -> dict | None:
    """The big batch against its alone time plus the small batches' own work plus 5 %: the
    target proposed on the issue where that work is more than 5 % of the alone run, which the
    issue's own 5 % cannot then hold (the issue is marked blocked on it). None when the work is
    not known."""
    if work is None:
        return None
    limit = BIG_LIMIT + work
    return {"limit": limit, "met": ratio <= limit}


def _with_work(v: dict | None) -> str:
    return "–" if v is None else f"{'yes' if v['met'] else 'no'} (≤ {v['limit']:.3f}×)"


def mix_table(out: dict, keys: tuple[str, ...]) -> list[str]:
    """One repeat's table: each small batch (its key as its place in `keys`), then the big batch
    with fair queues and in arrival order, then the pools' makespans."""
    alone, allow = out["alone"]["small"], out["alone"]["start_allowance_s"]
    inside = out["alone"].get("inside_s", {})
    verdict = judged(out)
    rows = ["| batch | key | model | submitted s | fair s | fifo s | alone s | fair vs alone | "
            "inside: fair / alone s | engine up | target s | met |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for sb in out["smalls"]:
        n = sb["name"]
        fair, fifo = out["fair"]["small"][n], out["fifo"]["small"][n]
        cell = "–"
        if fair.get("inside_s") is not None and inside.get(n) is not None:
            cell = f"{fair['inside_s']:.2f} / {inside[n]:.2f}"
        v = verdict["small"][n]
        rows.append(f"| {n} | {keys.index(sb['key'])} | {sb['model']} | {sb['at']:.1f} | "
                    f"{fair['s']:.1f} | {fifo['s']:.1f} | {alone[n]:.1f} | "
                    f"{fair['s'] / alone[n]:.2f}× | {cell} | "
                    f"{'yes' if fair['model_up'] else 'no'} | "
                    f"{v['target_s']:.2f} | {'yes' if v['met'] else 'NO'} |")
    big_alone = out["alone"]["big_s"]
    for name in ("fair", "fifo"):
        ratio = verdict["big"][name]
        rows.append(f"| big ({name}) | 0 | all | 0.0 | {out[name]['big_s']:.1f} | – | "
                    f"{big_alone:.1f} | {ratio:.2f}× | – | – | {BIG_LIMIT * big_alone:.1f} | "
                    f"{'yes' if ratio <= BIG_LIMIT else 'NO'} |")
    rows.append(f"\npool makespan: fair {out['fair']['makespan_s']:.1f} s, arrival order "
                f"{out['fifo']['makespan_s']:.1f} s ({verdict['pool']:.3f}×; target ≤ "
                f"{POOL_LIMIT:.2f}×); engine-start allowance per model: "
                + ", ".join(f"{m} {v:.1f} s" for m, v in allow.items()))
    if verdict["small_work"] is not None:
        rows.append(f"the small batches' own work: {verdict['small_work']:.1%} of the big "
                    f"batch's alone run (its cores × its time; `small_work`)")
        w = verdict["big_with_work"]
        rows.append(f"the big batch against alone + that work + 5 % (the target proposed on the "
                    f"issue): {verdict['big']['fair']:.2f}× against {w['limit']:.3f}×: "
                    f"{'met' if w['met'] else 'NOT met'}")
    return rows


def summary_table(repeats: list[dict]) -> list[str]:
    """Every repeat's verdicts in a row, then the medians: one run's plans may swing on the
    first answers (6 Dec 2026: the same code's big batch took 40 s, then 49 s, then 60 s), and
    its small batches' verdicts turn on tenths of a second, so one repeat decides little."""
    rows = ["| repeat | small batches met | big: fair vs alone (arrival order's) | "
            "pool: fair vs arrival order | big alone s | small batches' work | "
            "big within alone + work + 5 % | every target | "
            "probe s, before (during): fair / fifo / alone |",
            "|---:|---:|---:|---:|---:|---:|---|---|---|"]
    verdicts = [judged(r) for r in repeats]
    for k, (r, v) in enumerate(zip(repeats, verdicts)):
        probes = " / ".join(_probes(r[n]) for n in ("fair", "fifo", "alone"))
        rows.append(f"| {k + 1} | {v['small_met']} of {len(v['small'])} | "
                    f"{v['big']['fair']:.2f}× ({v['big']['fifo']:.2f}×) | {v['pool']:.3f}× | "
                    f"{r['alone']['big_s']:.1f} | {_share(v['small_work'])} | "
                    f"{_with_work(v['big_with_work'])} | {'yes' if v['met'] else 'no'} | "
                    f"{probes} |")
    med = statistics.median
    works = [v["small_work"] for v in verdicts if v["small_work"] is not None]
    rows.append(f"| median | {med(v['small_met'] for v in verdicts):g} of "
                f"{len(verdicts[0]['small'])} | {med(v['big']['fair'] for v in verdicts):.2f}× "
                f"({med(v['big']['fifo'] for v in verdicts):.2f}×) | "
                f"{med(v['pool'] for v in verdicts):.3f}× | "
                f"{med(r['alone']['big_s'] for r in repeats):.1f} | "
                f"{_share(med(works) if works else None)} | {_with_work_count(verdicts)} | "
                f"{sum(v['met'] for v in verdicts)} of {len(verdicts)} | – |")
    return rows


def _with_work_count(verdicts: list[dict]) -> str:
    known = [v["big_with_work"] for v in verdicts if v["big_with_work"] is not None]
    return f"{sum(w['met'] for w in known)} of {len(known)}" if known else "–"


def _probes(scene: dict) -> str:
    """The probe before a scene and the median of those during it (`bench.probe`)."""
    before = f"{scene['probe_s']:.3f}" if "probe_s" in scene else "–"
    during = scene.get("probe_during_s")
    return before if during is None else f"{before} ({during:.3f})"


def _share(x: float | None) -> str:
    return "–" if x is None else f"+{x:.1%}"


def table(out: dict) -> list[str]:
    alone_small, alone_big = out["fair"]["small_alone_s"], out["big_alone_s"]
    rows = ["| queue order | small batch s | vs alone | big batch s | vs alone | pool makespan s |",
            "|---|---:|---:|---:|---:|---:|"]
    for name in ("fair", "fifo"):
        r = out[name]
        rows.append(f"| {name} | {r['small_s']:.1f} | {r['small_s'] / alone_small:.2f}× | "
                    f"{r['big_s']:.1f} | {r['big_s'] / alone_big:.2f}× | {r['makespan_s']:.1f} |")
    rows.append(f"| alone | {alone_small:.1f} | – | {alone_big:.1f} | – | – |")
    return rows
