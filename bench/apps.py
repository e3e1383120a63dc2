"""Multi-LLM applications with dependent requests, measured through the real gateway, one upload each.

Three shapes on the demo models (`bench.makespan`'s random-weight tiny-a / tiny-b / small / medium):
- ensemble: tiny-a, tiny-b and small answer every question; medium fuses the three answers
  (its prompt holds all three: `{{custom_id}}` placeholders, `depends_on`);
- chain: documents of `--chunks` chunks; small summarises chunk i with summary i-1 in its prompt,
  then medium grades each document's last summary;
- judge: tiny-a, tiny-b and small answer every question; medium grades each answer.

Lengths: prompt and output lengths are joint rows of the conversation trace, prompts x `--scale`
(like `bench.makespan`) and outputs x `--output-scale` (a dependent's prompt is made of upstream
outputs: at x0.25 a summary would be ~8 tokens), each bounded per role (`CAPS`) so that a prompt
with its upstream outputs in it (re-tokenized: ~1.15x, at most ~1.3x the tokens generated) and its
output stay within the 1k context. Outputs are forced (`ignore_eos`, `max_tokens`), so every
strategy does the same work, and every output is checked (each `custom_id` once, exactly
`max_tokens` generated).

Strategies:
- `samullm`, `sequential`, `even-split`: the whole application as ONE pooled batch through a fresh
  `samullm serve` (`bench.makespan.run_gateway`, `metadata={"strategy": ...}`), timed from
  `batches.create` to the poll that sees `completed`; predicted = the executor's first `plan` event;
- `level-by-level`: as a user runs it on a batch API without dependencies: topological levels
  computed here, one batch per level through one gateway (default strategy), the client polling,
  downloading the outputs and filling them into the next level's prompts
  (`runtime.placeholders.substitute`) before uploading it; timed from the first `batches.create` to
  the poll that sees the last level `completed` (uploads and downloads in between included);
  predicted = the planner's `level-by-level` strategy on the whole file (`samullm plan --json`).
Each row's lower bound (`scheduler.bounds`, with measured / bound): the `lower_bound_s` of the run's
first plan event; level-by-level's is the whole file's, from `samullm plan --json`.

    .venv/bin/python -m bench.apps --data ../shared/data --quick-profile [--apps ensemble,chain,judge]
        [--strategies samullm,level-by-level,sequential,even-split] [--scale-requests 1.0]
        [--repeats 1] [--root .samullm/bench-makespan]
    .venv/bin/python -m bench.apps --apps smoke --skip-profiles    # ~3 min: tiny-b answers, tiny-a judges
    .venv/bin/python -m bench.apps --table .samullm/bench-makespan/apps.json

The default root is `bench.makespan`'s, so both benches share the models and the profiles.
Results: `<root>/apps.json` (every run with its executor events and, level by level, its upload,
run and download times) and `<root>/apps.csv`; the Markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.demo_setup import (CHAT, REPO, ensure_profiles, prepare, refresh_start_times,
                              trace_pairs, word_tokens, write_config, write_jsonl)
from bench.gateway_run import (add_wait_args, check_output, executor_events, free_port, run_gateway,
                               run_to_end, serving, wait_quiet)
from bench.makespan import add_run, describe_events, describe_plan, offline_plan, print_table, table
from runtime.placeholders import generated_text, placeholder, substitute

# per role: (most prompt tokens of its own, most output tokens); the worst dependent prompt is the
# fuser's: 16 + 128 + 3 x 128 x 1.3 = 643 tokens, + 32 out < 1024. The downstream models' outputs
# are short (a merged answer, a grade), so that their decoding stays short beside the engine starts
CAPS = {"question": (128, 128), "fuse": (16, 32), "chunk": (256, 128), "grade": (16, 16),
        "judge-question": (192, 160)}
STRATEGIES = ("samullm", "level-by-level", "sequential", "even-split")


@dataclass(frozen=True)
class App:
    shape: str  # "ensemble" | "chain" | "judge"
    upstream: tuple[str, ...]  # generators / the summariser / answerers
    downstream: str  # fuser / grader / judge
    n: int  # questions or documents


# sized so that the three apps x four strategies run in ~20 min on the 2 cores (engine starts,
# ~15 s each, are most of it: 4 models on 2 cores are 2 start rounds pooled, 3 level by level)
APPS = {
    "ensemble": App("ensemble", ("tiny-a", "tiny-b", "small"), "medium", 24),
    "chain": App("chain", ("small",), "medium", 12),
    "judge": App("judge", ("tiny-a", "tiny-b", "small"), "medium", 16),
    # two tiny models, two levels: the whole path (placeholders, levels, every strategy) in minutes
    "smoke": App("judge", ("tiny-b",), "tiny-a", 8),
}


# ---------------------------------------------------------------------------------------------
# requests

@dataclass
class Source:
    """Prompt texts and forced output lengths drawn from the trace, scaled and bounded per role."""

    data: Path | None
    words: list[str]
    rng: np.random.Generator
    scale: float = 0.25
    output_scale: float = 0.5

    def text(self, tokens: int) -> str:
        return " ".join(self.words[j] for j in self.rng.integers(0, len(self.words), tokens))

    def draw(self, n: int, role: str) -> list[tuple[str, int]]:
        """n (prompt text, max_tokens) of `role` (`CAPS`)."""
        max_p, max_o = CAPS[role]
        return [(self.text(max(4, min(int(p * self.scale), max_p))),
                 max(2, min(int(o * self.output_scale), max_o)))
                for p, o in trace_pairs(self.data, n, self.rng)]

    def outputs(self, n: int, role: str) -> list[int]:
        return [o for _, o in self.draw(n, role)]


def request(cid: str, model: str, text: str, max_tokens: int, deps: list[str] | None = None) -> dict:
    """One batch line, as `bench.makespan.make_requests` writes them, with `depends_on` if any."""
    return {"custom_id": cid, "method": "POST", "url": CHAT,
            "body": {"model": model, "messages": [{"role": "user", "content": text}],
                     "max_tokens": max_tokens, "ignore_eos": True, "temperature": 1.0},
            **({"depends_on": deps} if deps else {})}


def ensemble(src: Source, app: App) -> list[dict]:
    qs = src.draw(app.n, "question")
    answers = {g: src.outputs(app.n, "question") for g in app.upstream}  # each model its own lengths
    fuse = src.draw(app.n, "fuse")
    out = [request(f"{g}-q{q}", g, text, answers[g][q])
           for q, (text, _) in enumerate(qs) for g in app.upstream]
    for q, (text, _) in enumerate(qs):
        ids = [f"{g}-q{q}" for g in app.upstream]
        prompt = (f"{fuse[q][0]}\nQuestion: {text}\nAnswers:\n"
                  + "\n".join(f"- {placeholder(i)}" for i in ids))
        out.append(request(f"fuse-q{q}", app.downstream, prompt, fuse[q][1], ids))
    return out


def chain(src: Source, app: App, chunks: int) -> list[dict]:
    (summariser,) = app.upstream
    out = []
    for d in range(app.n):
        for i, (text, o) in enumerate(src.draw(chunks, "chunk")):
            prev = [f"doc{d}-{i - 1}"] if i else []
            head = f"Summary so far: {placeholder(prev[0])}\n" if prev else ""
            out.append(request(f"doc{d}-{i}", summariser, f"{head}Next part: {text}", o, prev))
        last = f"doc{d}-{chunks - 1}"
        ((text, o),) = src.draw(1, "grade")
        out.append(request(f"grade-{d}", app.downstream,
                           f"{text}\nGrade this summary: {placeholder(last)}", o, [last]))
    return out


def judge(src: Source, app: App) -> list[dict]:
    qs = src.draw(app.n, "judge-question")
    answers = {m: src.outputs(app.n, "judge-question") for m in app.upstream}
    grades = {m: src.draw(app.n, "grade") for m in app.upstream}
    out = [request(f"ans-q{q}-{m}", m, text, answers[m][q])
           for q, (text, _) in enumerate(qs) for m in app.upstream]
    out += [request(f"judge-q{q}-{m}", app.downstream,
                    f"Question: {text}\nAnswer: {placeholder(f'ans-q{q}-{m}')}\n{grades[m][q][0]}",
                    grades[m][q][1], [f"ans-q{q}-{m}"])
            for q, (text, _) in enumerate(qs) for m in app.upstream]
    return out


def make_app(app: App, src: Source, chunks: int = 3) -> list[dict]:
    if app.shape == "chain":
        return chain(src, app, chunks)
    return {"ensemble": ensemble, "judge": judge}[app.shape](src, app)


def levels(reqs: list[dict]) -> list[list[dict]]:
    """The requests by topological level: 0 without `depends_on`, else 1 + its upstreams' highest
    (the file order kept within a level)."""
    deps = {r["custom_id"]: r.get("depends_on") or [] for r in reqs}
    level: dict[str, int] = {}
    for cid in deps:  # iterative depth-first: a long chain needs no deep recursion
        todo = [cid]
        while todo:
            c = todo[-1]
            if c in level:
                todo.pop()
                continue
            missing = [u for u in deps[c] if u not in level]
            if missing:
                todo += missing
                continue
            level[c] = 1 + max((level[u] for u in deps[c]), default=-1)
            todo.pop()
    out: list[list[dict]] = [[] for _ in range(1 + max(level.values(), default=-1))]
    for r in reqs:
        out[level[r["custom_id"]]].append(r)
    return out


def level_requests(reqs: list[dict], outputs: dict[str, str]) -> list[dict]:
    """A level's lines as a user uploads them: placeholders filled with the downloaded outputs of
    the earlier levels, no `depends_on` (its ids are in other files)."""
    return [{k: v for k, v in r.items() if k != "depends_on"}
            | {"body": substitute(r["body"], r["url"], outputs)} for r in reqs]


def read_outputs(text: str) -> dict[str, str]:
    """custom_id -> generated text of an output file."""
    out = {}
    for line in text.splitlines():
        if line.strip():
            rec = json.loads(line)
            out[rec["custom_id"]] = generated_text(rec["response"]["body"], CHAT) or ""
    return out


# ---------------------------------------------------------------------------------------------
# level-by-level, the user's way: one gateway, one batch per level

@dataclass
class LevelRun:
    makespan_s: float
    levels: list[dict] = field(default_factory=list)  # per level: requests, upload/run/download s
    events: list[dict] = field(default_factory=list)

    @property
    def predicted_levels_s(self) -> list[float]:
        """The gateway's own prediction of each level's batch: the first plan after it was submitted
        (a `replan` for every level but the first: the executor has planned before)."""
        out, waiting = [], False
        for e in self.events:
            if e["event"] == "batch_submitted":
                waiting = True
            elif waiting and e["event"] in ("plan", "replan"):
                out.append(e["predicted_makespan_s"])
                waiting = False
        return out


def run_levels(cfg_path: Path, root: Path, reqs: list[dict], timeout_s: float, tag: str) -> LevelRun:
    lv = levels(reqs)
    outputs: dict[str, str] = {}
    rows = []
    with serving(cfg_path, root, tag, "level-by-level") as (client, log_path):
        t0 = None
        for i, mine in enumerate(lv):
            path = write_jsonl(root / "runs" / f"{tag}-level{i}.jsonl", level_requests(mine, outputs))
            t_up = time.monotonic()
            with open(path, "rb") as f:
                fobj = client.files.create(file=f, purpose="batch")
            t_create = time.monotonic()
            t0 = t0 if t0 is not None else t_create  # the first upload is before t0, as in run_gateway
            batch = run_to_end(client, fobj.id, None, timeout_s, f"level {i}")
            t_done = time.monotonic()
            text = client.files.content(batch.output_file_id).text
            check_output(text, mine, f"level {i}")
            outputs |= read_outputs(text)
            rows.append({"requests": len(mine), "upload_s": t_create - t_up,
                         "run_s": t_done - t_create, "download_s": time.monotonic() - t_done})
        makespan = t_done - t0
    return LevelRun(makespan, rows, executor_events(log_path))


# ---------------------------------------------------------------------------------------------

def predicted(offline: dict, strategy: str) -> float | None:
    return ((offline.get("strategies") or {}).get(strategy) or {}).get("makespan_s")


def run_app(name: str, reqs: list[dict], strategies: list[str], cfg_path: Path, root: Path,
            args: argparse.Namespace) -> dict:
    inp = write_jsonl(root / f"apps-{name}.jsonl", reqs)
    models = dict(Counter(r["body"]["model"] for r in reqs))
    toks = sum(r["body"]["max_tokens"] for r in reqs)
    lv = [len(x) for x in levels(reqs)]
    print(f"\n== {name}: {models}, {len(reqs)} requests in {len(lv)} levels {lv}, "
          f"{toks} output tokens", flush=True)
    offline = offline_plan(cfg_path, inp)
    for line in describe_plan(offline):
        print(line)
    lbl_pred = predicted(offline, "level-by-level")
    if "level-by-level" in strategies and lbl_pred is None:
        print("  no level-by-level prediction (samullm plan failed, or its planner has no such "
              "strategy yet): that row's predicted column stays empty; the gateway's own plans of "
              "the levels are in apps.json (predicted_levels_s)")
    row = {"workload": name, "models": models, "requests": len(reqs), "levels": lv,
           "output_tokens": toks, "offline_plan": offline, "runs": {}}
    for rep in range(args.repeats):
        for s in strategies:
            load = wait_quiet(args.max_load, args.max_wait)
            tag = f"apps-{name}-r{rep}"
            if s == "level-by-level":
                lrun = run_levels(cfg_path, root, reqs, args.timeout, tag)
                # the whole file's bound (`samullm plan`): the first level's plan sees one level
                rec = {"measured_s": lrun.makespan_s, "predicted_s": lbl_pred,
                       "lower_bound_s": offline.get("lower_bound_s"), "load": load,
                       "levels": lrun.levels, "predicted_levels_s": lrun.predicted_levels_s,
                       "events": lrun.events}
                detail = "; levels " + ", ".join(
                    f"{x['run_s']:.1f}s (+{x['upload_s'] + x['download_s']:.2f}s up/down)"
                    for x in lrun.levels) + (f"; the gateway predicted them "
                                             f"{sum(rec['predicted_levels_s']):.1f} s in all")
            else:
                run = run_gateway(cfg_path, root, inp, s, reqs, args.timeout, tag)
                rec = {"measured_s": run.makespan_s, "predicted_s": run.predicted_s,
                       "lower_bound_s": run.lower_bound_s, "load": load,
                       "offline_predicted_s": predicted(offline, s), "events": run.events}
                detail = ""
                for line in describe_events(run):
                    print(line)
            pred = rec["predicted_s"]
            print(f"  {s:<15} measured {rec['measured_s']:7.1f} s   predicted "
                  f"{pred if pred is not None else float('nan'):7.1f} s   (load {load:.2f}){detail}",
                  flush=True)
            add_run(row["runs"], s, rec)
    return row


def write_csv(path: Path, results: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["app", "strategy", "measured_s", "predicted_s", "error", "load",
                    "samullm_speedup"])
        for row in results:
            ours = row["runs"].get("samullm", {}).get("measured_s")
            for s, r in row["runs"].items():
                pred, meas = r.get("predicted_s"), r["measured_s"]
                w.writerow([row["workload"], s, f"{meas:.2f}", f"{pred:.2f}" if pred else "",
                            f"{(pred - meas) / meas:+.3f}" if pred else "", f"{r.get('load', 0):.2f}",
                            f"{meas / ours:.3f}" if ours and s != "samullm" else ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None,
                    help="shared data dir (traces/splitwise_conv.csv); default: shipped prior tables")
    ap.add_argument("--root", type=Path, default=REPO / ".samullm" / "bench-makespan",
                    help="models, profiles, logs and results (default: bench.makespan's)")
    ap.add_argument("--apps", default="ensemble,chain,judge", help=f"of {', '.join(APPS)}")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--scale", type=float, default=0.25, help="trace prompt lengths x this")
    ap.add_argument("--output-scale", type=float, default=0.5, help="trace output lengths x this")
    ap.add_argument("--scale-requests", type=float, default=1.0,
                    help="questions / documents per app x this")
    ap.add_argument("--chunks", type=int, default=3, help="chunks per document (chain)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick-profile", action="store_true")
    ap.add_argument("--skip-profiles", action="store_true",
                    help="plan with the profiles stored (none: the analytic estimate): smoke runs")
    ap.add_argument("--refresh-start-times", action="store_true")
    add_wait_args(ap)
    ap.add_argument("--repeats", type=int, default=1, help="runs per strategy; the table shows medians")
    args = ap.parse_args(argv)
    strategies = args.strategies.split(",")
    for what, names, known in (("apps", args.apps.split(","), APPS),
                               ("strategies", strategies, STRATEGIES)):
        if set(names) - set(known):
            ap.error(f"unknown {what} {sorted(set(names) - set(known))} (of {', '.join(known)})")
    apps = {a: APPS[a] for a in args.apps.split(",")}
    root, paths = prepare(args.root)
    cfg_path = write_config(root, paths, free_port())
    models = sorted({m for a in apps.values() for m in (*a.upstream, a.downstream)})
    if not args.skip_profiles:
        ensure_profiles(cfg_path, root, models, args.quick_profile)
    if args.refresh_start_times:
        wait_quiet(args.max_load, args.max_wait)
        refresh_start_times(cfg_path, root, models)
    words = word_tokens(paths["tiny-a"])
    results = []
    for name, app in apps.items():
        app = dataclasses.replace(app, n=max(1, round(app.n * args.scale_requests)))
        # seeded by the app's place in APPS: `--apps judge` draws what the full run draws
        src = Source(args.data, words, np.random.default_rng([args.seed, list(APPS).index(name)]),
                     args.scale, args.output_scale)
        results.append(run_app(name, make_app(app, src, args.chunks), strategies, cfg_path, root, args))
        (root / "apps.json").write_text(json.dumps(results, indent=1, default=str))
        write_csv(root / "apps.csv", results)
    print(f"\nresults: {root / 'apps.json'}, {root / 'apps.csv'}\n")
    for line in table(results):
        print(line)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:  # re-print the table of an earlier apps.json
        raise SystemExit(print_table(Path(sys.argv[2])))
    raise SystemExit(main())
