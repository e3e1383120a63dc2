"""Many users, one gateway: a small batch behind a big one, with fair queues and in arrival order.

The scene (on `bench.demo_setup`'s demo models, outputs forced and checked): a big batch of `--big`
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
and the client's polls every 0.25 s add up to one interval at each end of both
(`bench.fairness_verdict.inside_s`).
The mix runs `--repeats` times (fair, arrival order, alone, in turn); each repeat gets its table
and the summary gives every repeat's verdicts and their medians (`bench.fairness_verdict`).

    .venv/bin/python -m bench.fairness --data ../shared/data --skip-profiles [--big 800] [--mix]
        [--mix-only] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import demo_setup as setup  # noqa: E402
from bench import gateway_run as gw  # noqa: E402
from bench.fairness_verdict import (engine_cores, engine_up, inside_s, mix_table,  # noqa: E402
                                    summary_table, table)
from bench.probe import ProbeSampler, machine_probe_s  # noqa: E402



def requests(tag: str, n: int, out_tokens: int, words: list[str], seed: int,
             model: str = "small") -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"custom_id": f"{tag}-{i}", "method": "POST", "url": setup.CHAT,
             "body": {"model": model, "max_tokens": out_tokens, "ignore_eos": True,
                      "temperature": 1.0, "messages": [{"role": "user", "content": " ".join(
                          words[j] for j in rng.integers(0, len(words), 32))}]}}
            for i in range(n)]


def timed(client: Any, file_id: str, reqs: list[dict], what: str, out: dict) -> None:
    """Create a batch of `file_id`, wait for it, check it; `out` gets its start and end."""
    out["start"], out["wall"] = time.monotonic(), time.time()
    batch = gw.run_to_end(client, file_id, None, 900, what)
    out["end"], out["id"] = time.monotonic(), batch.id
    gw.check_output(client.files.content(batch.output_file_id).text, reqs, what)


def upload(client: Any, path: Path) -> str:
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="batch").id


def scene(cfg: Path, root: Path, tag: str, big: list[dict], small: list[dict], delay_s: float,
          alone_small: bool) -> dict:
    with gw.serving(cfg, root, tag, "samullm") as (client, _log):
        big_id = upload(client, setup.write_jsonl(root / f"fair-{tag}-big.jsonl", big))
        small_id = upload(client, setup.write_jsonl(root / f"fair-{tag}-small.jsonl", small))
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
    with gw.serving(cfg, root, "big-alone", "samullm") as (client, _log):
        b: dict = {}
        timed(client, upload(client, setup.write_jsonl(root / "fair-alone-big.jsonl", big)), big,
              "big alone", b)
    return b["end"] - b["start"]


# ---------------------------------------------------------------------------------------------
# the mix: three keys, one big batch, ten small ones at random times

KEYS = ("bench-key-big", "bench-key-team-b", "bench-key-team-c")
MIX_SHARE = {"tiny-a": 0.45, "small": 0.40, "medium": 0.15}


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


def mix_scene(cfg: Path, root: Path, tag: str, big: list[dict], smalls: list[dict],
              rep: int = 1) -> dict:
    """The mix on one gateway; its log is `logs/gateway-mix-<tag>-r<rep>-samullm.log` (each
    repeat's kept: a verdict is read off its events)."""
    with gw.serving(cfg, root, f"mix-{tag}-r{rep}", "samullm", api_key=KEYS[0]) as (client, log):
        cl = clients_of(client)
        big_id = upload(cl[KEYS[0]], setup.write_jsonl(root / f"mix-{tag}-big.jsonl", big))
        ids = {sb["name"]: upload(cl[sb["key"]], setup.write_jsonl(
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
        events = gw.executor_events(log)
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
    with gw.serving(cfg, root, "mix-alone", "samullm", api_key=KEYS[0]) as (client, log):
        cl = clients_of(client)
        for model in MIX_SHARE:
            group = [sb for sb in smalls if sb["model"] == model]
            if not group:
                continue
            for k, sb in enumerate([group[0]] + group):  # the first run starts the engine
                fid = upload(cl[sb["key"]], setup.write_jsonl(
                    root / f"mix-alone-{sb['name']}.jsonl", sb["reqs"]))
                o: dict = {}
                timed(cl[sb["key"]], fid, sb["reqs"], f"{sb['name']} alone", o)
                if k == 0:
                    cold = o["end"] - o["start"]
                else:
                    out["small"][sb["name"]] = o["end"] - o["start"]
                    ids[sb["name"]] = o["id"]
            out["start_allowance_s"][model] = max(0.0, cold - out["small"][group[0]["name"]])
        events = gw.executor_events(log)
        out["inside_s"] = {name: inside_s(events, bid) for name, bid in ids.items()}
        out["cores"] = {m: len(c) for m, c in engine_cores(events).items()}
    with gw.serving(cfg, root, "mix-big-alone", "samullm", api_key=KEYS[0]) as (client, log):
        cl = clients_of(client)
        b: dict = {}
        big_file = upload(cl[KEYS[0]], setup.write_jsonl(root / "mix-alone-big.jsonl", big))
        timed(cl[KEYS[0]], big_file, big, "big alone", b)
        out["big_s"] = b["end"] - b["start"]
        out["big_cores"] = len(set().union(*engine_cores(gw.executor_events(log)).values()))
    return out


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
            load = gw.wait_quiet(args.max_load, args.max_wait)
            probe = machine_probe_s()
            with ProbeSampler() as during:
                out[name] = mix_scene(cfg, root, name, big, smalls, rep + 1)
            out[name] |= {"load": load, "probe_s": probe} | during.summary()
            print(f"  repeat {rep + 1}, mix {name}: big {out[name]['big_s']:.1f} s, makespan "
                  f"{out[name]['makespan_s']:.1f} s (load {load:.2f}, probe {probe:.3f} s, during "
                  f"{out[name].get('probe_during_s', float('nan')):.3f} s)", flush=True)
        load = gw.wait_quiet(args.max_load, args.max_wait)
        probe = machine_probe_s()
        with ProbeSampler() as during:
            out["alone"] = mix_alone(with_keys(fair_cfg, "mix-alone.toml"), root, big, smalls)
        out["alone"] |= {"load": load, "probe_s": probe} | during.summary()
        repeats.append(out)
        (root / "fairness-mix.json").write_text(json.dumps({"repeats": repeats}, indent=1))
        print(f"repeat {rep + 1}:")
        for line in mix_table(out, KEYS):
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
    root, paths = setup.prepare(args.root)
    fair_cfg = setup.write_config(root, paths, gw.free_port())
    fifo_cfg = root / "fifo.toml"
    fifo_cfg.write_text(fair_cfg.read_text() + '\n[scheduler]\nfairness = "fifo"\n')
    if not args.skip_profiles:
        setup.ensure_profiles(fair_cfg, root, ["small"], args.quick_profile)
    words = setup.word_tokens(paths["tiny-a"])
    if args.mix or args.mix_only:
        if not args.skip_profiles:
            setup.ensure_profiles(fair_cfg, root, list(MIX_SHARE), args.quick_profile)
        if args.mix_only:
            run_mix(args, root, fair_cfg, fifo_cfg, words)
            return 0
    big, small = requests("big", args.big, 64, words, 1), requests("small", 5, 16, words, 2)
    out: dict[str, Any] = {"big_requests": args.big, "delay_s": args.delay}
    for name, cfg in (("fair", fair_cfg), ("fifo", fifo_cfg)):
        load = gw.wait_quiet(args.max_load, args.max_wait)
        out[name] = scene(cfg, root, name, big, small, args.delay, alone_small=name == "fair")
        out[name]["load"] = load
        print(f"  {name}: {json.dumps({k: round(v, 1) for k, v in out[name].items()})}", flush=True)
    load = gw.wait_quiet(args.max_load, args.max_wait)
    out["big_alone_s"] = big_alone(fair_cfg, root, big)
    print(f"  big alone: {out['big_alone_s']:.1f} s (load {load:.2f})", flush=True)
    (root / "fairness.json").write_text(json.dumps(out, indent=1))
    for line in table(out):
        print(line)
    if args.mix:
        run_mix(args, root, fair_cfg, fifo_cfg, words)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
