"""Many users, one gateway: a small batch behind a big one, with fair queues and in arrival order.

The scene (on `bench.makespan`'s demo models, outputs forced and checked): a big batch of `--big`
requests on `small` (64 tokens out each) is submitted to a gateway whose spare engine processes
are ready; `--delay` seconds later a batch of 5 requests on `small` (16 tokens out). Measured, each
from its own `batches.create` to the poll that sees it `completed`:
- `fair` (`[scheduler] fairness = "fair"`, the default) and `fifo` (arrival order): the small
  batch's and the big batch's completion, and the pool's makespan (first create to last done);
- alone: the small batch on the same gateway right after (its engine still warm, nothing else
  queued), and the big batch by itself on a fresh gateway.
Targets (the issue): the small batch within 2x its alone time; the big batch at most 5 % slower
than alone; the pool's makespan at most 3 % worse than in arrival order.

`--mix`: three API keys share the gateway over the three demo models: key 0 submits one big batch
(`--mix-big`, 2,000 requests: tiny-a 45 %, small 40 %, medium 15 %, 32 tokens out each), keys 1
and 2 ten 20-request batches of one model each (16 tokens out) at seeded random times in the first
`--mix-span` seconds. Measured with fair queues and in arrival order; each small batch is also run
alone on a gateway with its model's engine warm (a first batch of that model starts the engine; its
time minus the warm repeat is that model's engine-start allowance), and the big batch alone on a
fresh gateway. Target per small batch: within 2x its alone time, plus the allowance when the gateway
had no engine of its model up when it was submitted (read from the gateway's engine events). A
batch whose model's engine was up is judged by its time inside the gateway (its `batch_submitted`
to its `batch_finished` event, alone the same): it and its alone time are a fraction of a second,
and the client's polls every 0.25 s add up to one interval at each end of both (`inside_s`).
The mix runs `--repeats` times (fair, arrival order, alone, in turn); each repeat gets its table
and the summary gives every repeat's verdicts and their medians (`summary_table`).

    .venv/bin/python -m bench.fairness --data ../shared/data --skip-profiles [--big 800] [--mix]
        [--mix-only] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import makespan as mk  # noqa: E402
from bench.probe import ProbeSampler, machine_probe_s  # noqa: E402

CHAT = "/v1/chat/completions"


def requests(tag: str, n: int, out_tokens: int, words: list[str], seed: int,
             model: str = "small") -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"custom_id": f"{tag}-{i}", "method": "POST", "url": CHAT,
             "body": {"model": model, "max_tokens": out_tokens, "ignore_eos": True,
                      "temperature": 1.0, "messages": [{"role": "user", "content": " ".join(
                          words[j] for j in rng.integers(0, len(words), 32))}]}}
            for i in range(n)]


def timed(client: Any, file_id: str, reqs: list[dict], what: str, out: dict) -> None:
    """Create a batch of `file_id`, wait for it, check it; `out` gets its start and end."""
    out["start"], out["wall"] = time.monotonic(), time.time()
    batch = mk.run_to_end(client, file_id, None, 900, what)
    out["end"], out["id"] = time.monotonic(), batch.id
    mk.check_output(client.files.content(batch.output_file_id).text, reqs, what)


def upload(client: Any, path: Path) -> str:
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="batch").id


def scene(cfg: Path, root: Path, tag: str, big: list[dict], small: list[dict], delay_s: float,
          alone_small: bool) -> dict:
    with mk.serving(cfg, root, tag, "samullm") as (client, _log):
        big_id = upload(client, mk.write_jsonl(root / f"fair-{tag}-big.jsonl", big))
        small_id = upload(client, mk.write_jsonl(root / f"fair-{tag}-small.jsonl", small))
        b: dict = {}
        s: dict = {}
        t = threading.Thread(target=timed, args=(client, big_id, big, "big", b))
        t.start()
        time.sleep(delay_s)
        timed(client, small_id, small, "small", s)
        t.join()
        rec = {"big_s": b["end"] - b["start"], "small_s": s["end"] - s["start"],
               "makespan_s": max(b["end"], s["end"]) - b["start"]}
        if alone_small:  # the engine is warm, nothing else queued
            a: dict = {}
            timed(client, small_id, small, "small alone", a)
            rec["small_alone_s"] = a["end"] - a["start"]
    return rec


def big_alone(cfg: Path, root: Path, big: list[dict]) -> float:
    with mk.serving(cfg, root, "big-alone", "samullm") as (client, _log):
        b: dict = {}
        timed(client, upload(client, mk.write_jsonl(root / "fair-alone-big.jsonl", big)), big,
              "big alone", b)
    return b["end"] - b["start"]


# ---------------------------------------------------------------------------------------------
# the mix: three keys, one big batch, ten small ones at random times

KEYS = ("bench-key-big", "bench-key-team-b", "bench-key-team-c")
MIX_SHARE = {"tiny-a": 0.45, "small": 0.40, "medium": 0.15}
BIG_LIMIT = 1.05  # the big batch at most 5 % slower than alone (the targets)
POOL_LIMIT = 1.03  # the pool's makespan at most 3 % worse than in arrival order


def with_keys(cfg: Path, name: str) -> Path:
    out = cfg.with_name(name)
    out.write_text(cfg.read_text() + f"\n[auth]\napi_keys = {json.dumps(list(KEYS))}\n")
    return out


def mix_batches(n_big: int, span_s: float, words: list[str], seed: int
                ) -> tuple[list[dict], list[dict]]:
    """The big batch's requests (models interleaved) and the small batches: name, key, model,
    submit offset, requests."""
    rng = np.random.default_rng(seed)
    big: list[dict] = []
    for k, (model, share) in enumerate(MIX_SHARE.items()):
        big += requests(f"big-{model}", round(n_big * share), 32, words, seed + 10 + k, model)
    big = [big[i] for i in rng.permutation(len(big))]
    models = list(MIX_SHARE)
    smalls = [{"name": f"s{k}", "key": KEYS[1 + k % 2], "model": models[rng.integers(len(models))],
               "at": float(rng.uniform(2.0, span_s))} for k in range(10)]
    for k, sb in enumerate(smalls):
        sb["reqs"] = requests(sb["name"], 20, 16, words, seed + 100 + k, sb["model"])
    return big, sorted(smalls, key=lambda sb: sb["at"])


def clients_of(client: Any) -> dict[str, Any]:
    from openai import OpenAI

    return {k: OpenAI(base_url=str(client.base_url), api_key=k, max_retries=2) for k in KEYS}


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


def mix_scene(cfg: Path, root: Path, tag: str, big: list[dict], smalls: list[dict],
              rep: int = 1) -> dict:
    """The mix on one gateway; its log is `logs/gateway-mix-<tag>-r<rep>-samullm.log` (each
    repeat's kept: a verdict is read off its events)."""
    with mk.serving(cfg, root, f"mix-{tag}-r{rep}", "samullm", api_key=KEYS[0]) as (client, log):
        cl = clients_of(client)
        big_id = upload(cl[KEYS[0]], mk.write_jsonl(root / f"mix-{tag}-big.jsonl", big))
        ids = {sb["name"]: upload(cl[sb["key"]], mk.write_jsonl(
            root / f"mix-{tag}-{sb['name']}.jsonl", sb["reqs"])) for sb in smalls}
        outs: dict[str, dict] = {sb["name"]: {} for sb in smalls}
        b: dict = {}
        t0 = time.monotonic()

        def small_at(sb: dict) -> None:
            time.sleep(max(0.0, t0 + sb["at"] - time.monotonic()))
            timed(cl[sb["key"]], ids[sb["name"]], sb["reqs"], sb["name"], outs[sb["name"]])

        threads = [threading.Thread(target=timed, args=(cl[KEYS[0]], big_id, big, "big", b))]
        threads += [threading.Thread(target=small_at, args=(sb,)) for sb in smalls]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        missing = [n for n, o in outs.items() if "end" not in o] + ([] if "end" in b else ["big"])
        if missing:
            raise RuntimeError(f"mix {tag}: batches without a result: {missing}")
        events = mk.executor_events(log)
    return {"big_s": b["end"] - b["start"],
            "makespan_s": max([b["end"]] + [o["end"] for o in outs.values()]) - t0,
            "small": {sb["name"]: {"s": outs[sb["name"]]["end"] - outs[sb["name"]]["start"],
                                   "inside_s": inside_s(events, outs[sb["name"]]["id"]),
                                   "model_up": engine_up(events, sb["model"],
                                                         outs[sb["name"]]["wall"])}
                      for sb in smalls}}


def mix_alone(cfg: Path, root: Path, big: list[dict], smalls: list[dict]) -> dict:
    """Each small batch alone with its model's engine warm, each model's start allowance, and the
    big batch alone on a fresh gateway."""
    out: dict[str, Any] = {"small": {}, "start_allowance_s": {}, "inside_s": {}}
    ids: dict[str, str] = {}
    with mk.serving(cfg, root, "mix-alone", "samullm", api_key=KEYS[0]) as (client, log):
        cl = clients_of(client)
        for model in MIX_SHARE:
            group = [sb for sb in smalls if sb["model"] == model]
            if not group:
                continue
            for k, sb in enumerate([group[0]] + group):  # the first run starts the engine
                fid = upload(cl[sb["key"]], mk.write_jsonl(
                    root / f"mix-alone-{sb['name']}.jsonl", sb["reqs"]))
                o: dict = {}
                timed(cl[sb["key"]], fid, sb["reqs"], f"{sb['name']} alone", o)
                if k == 0:
                    cold = o["end"] - o["start"]
                else:
                    out["small"][sb["name"]] = o["end"] - o["start"]
                    ids[sb["name"]] = o["id"]
            out["start_allowance_s"][model] = max(0.0, cold - out["small"][group[0]["name"]])
        events = mk.executor_events(log)
        out["inside_s"] = {name: inside_s(events, bid) for name, bid in ids.items()}
        out["cores"] = {m: len(c) for m, c in engine_cores(events).items()}
    with mk.serving(cfg, root, "mix-big-alone", "samullm", api_key=KEYS[0]) as (client, log):
        cl = clients_of(client)
        b: dict = {}
        timed(cl[KEYS[0]], upload(cl[KEYS[0]], mk.write_jsonl(root / "mix-alone-big.jsonl", big)),
              big, "big alone", b)
        out["big_s"] = b["end"] - b["start"]
        out["big_cores"] = len(set().union(*engine_cores(mk.executor_events(log)).values()))
    return out


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
    return {"small": small, "small_met": sum(v["met"] for v in small.values()), "big": big,
            "pool": out["fair"]["makespan_s"] / out["fifo"]["makespan_s"],
            "small_work": small_work(out),
            "met": all(v["met"] for v in small.values()) and big["fair"] <= BIG_LIMIT
            and out["fair"]["makespan_s"] <= POOL_LIMIT * out["fifo"]["makespan_s"]}


def mix_table(out: dict) -> list[str]:
    """One repeat's table: each small batch, then the big batch with fair queues and in arrival
    order, then the pools' makespans."""
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
        rows.append(f"| {n} | {KEYS.index(sb['key'])} | {sb['model']} | {sb['at']:.1f} | "
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
    return rows


def summary_table(repeats: list[dict]) -> list[str]:
    """Every repeat's verdicts in a row, then the medians: one run's plans may swing on the
    first answers (6 Dec 2026: the same code's big batch took 40 s, then 49 s, then 60 s), and
    its small batches' verdicts turn on tenths of a second, so one repeat decides little."""
    rows = ["| repeat | small batches met | big: fair vs alone (arrival order's) | "
            "pool: fair vs arrival order | big alone s | small batches' work | every target | "
            "probe s, before (during): fair / fifo / alone |",
            "|---:|---:|---:|---:|---:|---:|---|---|"]
    verdicts = [judged(r) for r in repeats]
    for k, (r, v) in enumerate(zip(repeats, verdicts)):
        probes = " / ".join(_probes(r[n]) for n in ("fair", "fifo", "alone"))
        rows.append(f"| {k + 1} | {v['small_met']} of {len(v['small'])} | "
                    f"{v['big']['fair']:.2f}× ({v['big']['fifo']:.2f}×) | {v['pool']:.3f}× | "
                    f"{r['alone']['big_s']:.1f} | {_share(v['small_work'])} | "
                    f"{'yes' if v['met'] else 'no'} | {probes} |")
    med = statistics.median
    works = [v["small_work"] for v in verdicts if v["small_work"] is not None]
    rows.append(f"| median | {med(v['small_met'] for v in verdicts):g} of "
                f"{len(verdicts[0]['small'])} | {med(v['big']['fair'] for v in verdicts):.2f}× "
                f"({med(v['big']['fifo'] for v in verdicts):.2f}×) | "
                f"{med(v['pool'] for v in verdicts):.3f}× | "
                f"{med(r['alone']['big_s'] for r in repeats):.1f} | "
                f"{_share(med(works) if works else None)} | "
                f"{sum(v['met'] for v in verdicts)} of {len(verdicts)} | – |")
    return rows


def _probes(scene: dict) -> str:
    """The probe before a scene and the median of those during it (`bench.probe`)."""
    before = f"{scene['probe_s']:.3f}" if "probe_s" in scene else "–"
    during = scene.get("probe_during_s")
    return before if during is None else f"{before} ({during:.3f})"


def _share(x: float | None) -> str:
    return "–" if x is None else f"+{x:.1%}"


def run_mix(args: argparse.Namespace, root: Path, fair_cfg: Path, fifo_cfg: Path,
            words: list[str]) -> None:
    """`--repeats` times: the mix with fair queues, in arrival order, then each batch alone, so
    that a slow spell of the machine falls on one repeat's sides alike."""
    big, smalls = mix_batches(args.mix_big, args.mix_span, words, seed=7)
    shape = {"big_requests": len(big),
             "smalls": [{k: v for k, v in sb.items() if k != "reqs"} for sb in smalls]}
    repeats: list[dict] = []
    for rep in range(args.repeats):
        out: dict[str, Any] = dict(shape)
        for name, cfg in (("fair", with_keys(fair_cfg, "mix-fair.toml")),
                          ("fifo", with_keys(fifo_cfg, "mix-fifo.toml"))):
            load = mk.wait_quiet(args.max_load, args.max_wait)
            probe = machine_probe_s()
            with ProbeSampler() as during:
                out[name] = mix_scene(cfg, root, name, big, smalls, rep + 1)
            out[name] |= {"load": load, "probe_s": probe} | during.summary()
            print(f"  repeat {rep + 1}, mix {name}: big {out[name]['big_s']:.1f} s, makespan "
                  f"{out[name]['makespan_s']:.1f} s (load {load:.2f}, probe {probe:.3f} s, during "
                  f"{out[name].get('probe_during_s', float('nan')):.3f} s)", flush=True)
        load = mk.wait_quiet(args.max_load, args.max_wait)
        probe = machine_probe_s()
        with ProbeSampler() as during:
            out["alone"] = mix_alone(with_keys(fair_cfg, "mix-alone.toml"), root, big, smalls)
        out["alone"] |= {"load": load, "probe_s": probe} | during.summary()
        repeats.append(out)
        (root / "fairness-mix.json").write_text(json.dumps({"repeats": repeats}, indent=1))
        print(f"repeat {rep + 1}:")
        for line in mix_table(out):
            print(line)
        print(flush=True)
    for line in summary_table(repeats):
        print(line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--root", type=Path, default=REPO / ".samullm" / "bench-makespan")
    ap.add_argument("--big", type=int, default=800)
    ap.add_argument("--delay", type=float, default=8.0)
    ap.add_argument("--skip-profiles", action="store_true")
    ap.add_argument("--quick-profile", action="store_true")
    ap.add_argument("--max-load", type=float, default=1.5)
    ap.add_argument("--max-wait", type=float, default=900)
    ap.add_argument("--mix", action="store_true", help="also the three-key mix")
    ap.add_argument("--mix-only", action="store_true", help="only the three-key mix")
    ap.add_argument("--mix-big", type=int, default=2000)
    ap.add_argument("--mix-span", type=float, default=45.0)
    ap.add_argument("--repeats", type=int, default=3,
                    help="the mix's repeats (each: fair, arrival order, alone)")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    (root / "logs").mkdir(parents=True, exist_ok=True)
    (root / "runs").mkdir(parents=True, exist_ok=True)
    paths = mk.write_models(root)
    fair_cfg = mk.write_config(root, paths, mk.free_port())
    fifo_cfg = root / "fifo.toml"
    fifo_cfg.write_text(fair_cfg.read_text() + '\n[scheduler]\nfairness = "fifo"\n')
    if not args.skip_profiles:
        mk.ensure_profiles(fair_cfg, root, ["small"], args.quick_profile)
    words = mk.word_tokens(paths["tiny-a"])
    if args.mix or args.mix_only:
        if not args.skip_profiles:
            mk.ensure_profiles(fair_cfg, root, list(MIX_SHARE), args.quick_profile)
        if args.mix_only:
            run_mix(args, root, fair_cfg, fifo_cfg, words)
            return 0
    big, small = requests("big", args.big, 64, words, 1), requests("small", 5, 16, words, 2)
    out: dict[str, Any] = {"big_requests": args.big, "delay_s": args.delay}
    for name, cfg in (("fair", fair_cfg), ("fifo", fifo_cfg)):
        load = mk.wait_quiet(args.max_load, args.max_wait)
        out[name] = scene(cfg, root, name, big, small, args.delay, alone_small=name == "fair")
        out[name]["load"] = load
        print(f"  {name}: {json.dumps({k: round(v, 1) for k, v in out[name].items()})}", flush=True)
    load = mk.wait_quiet(args.max_load, args.max_wait)
    out["big_alone_s"] = big_alone(fair_cfg, root, big)
    print(f"  big alone: {out['big_alone_s']:.1f} s (load {load:.2f})", flush=True)
    (root / "fairness.json").write_text(json.dumps(out, indent=1))
    for line in table(out):
        print(line)
    if args.mix:
        run_mix(args, root, fair_cfg, fifo_cfg, words)
    return 0


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


if __name__ == "__main__":
    raise SystemExit(main())
