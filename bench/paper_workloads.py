"""The paper's workloads (PAPER.md §5) as planning problems on A100/H100 pools, for the benchmarks.

- ensembling: the 9 LLM-Blender models, every prompt to every model, `max_tokens` 512;
- routing: 5 models sharing 10,000 requests unevenly, `max_tokens` 4096. RouterBench's per-model
  shares are not public in the material we have; we assume 25 % Mistral-7B, 25 % Mixtral-8x7B, 20 %
  WizardLM-13B, 15 % Llama-2-70B, 15 % CodeLlama-34B (code prompts);
- mixed: both at once.

Multi-LLM applications with dependent requests (`SimRequest.upstream`; rids unique per model,
`prompt_len` = a request's own tokens, the planner adds its upstream requests' outputs):
- ensemble + fuser (LLM-Blender): the 9 models answer every prompt; one fuser request per prompt
  takes all 9 answers (`FUSER`, Llama-2-70b-chat: PAPER.md §5 says the paper does not model
  LLM-Blender's ranker and fuser, whose own GenFuser is Flan-T5-XL; a chat LLM takes its place, its
  prompt the question, an instruction and the answers, cut to its 4k context by the planner);
- chain summarisation (BooookScore): per document, chunk i (2,048 tokens) is summarised by
  vicuna-13b-v1.5 with summary i−1 in its prompt (`max_tokens` 900), then Llama-2-70b-chat grades the
  final summary (`grades` questions, PAPER.md: 1-6). Chunks per document are not in the material we
  have: uniform in `chunks` (default 2-8; BookSum chapters are ~3 chunks, whole books far more);
- `union` pools several applications into one (the mixed application: rids renumbered per model,
  so a model two applications share runs both's requests).

Lengths: with `--data DIR` (the reference traces, `DIR/traces/*.csv`), (prompt, output) pairs are
drawn jointly from the Azure conversation trace (code trace for CodeLlama); without it, prompt and
output lengths are drawn independently from the shipped quantile tables (`scheduler/data/
length_prior.json`, derived from the same traces). Outputs are capped at `max_tokens` and at the
context left; prompts are cut so that `max_tokens` fits in the context.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np

from scheduler.archs import paper_model_spec
from scheduler.gpu_profiles import gpu_latency_model, gpu_load_time_s
from scheduler.latency import LatencyModel
from scheduler.lengths import prior_quantiles
from scheduler.placement import gpu_kv_bytes_per_rank
from scheduler.planner import PlanningProblem
from scheduler.types import DevicePool, ModelSpec, SimRequest

GiB = 1024**3
ENSEMBLE = ["vicuna-13b-v1.5", "oasst-sft-4-pythia-12b", "alpaca-13b", "baize-v2-13b", "koala-13b",
            "dolly-v2-12b", "mpt-7b-chat", "chatglm3-6b", "stablelm-tuned-alpha-7b"]
ROUTING = {"llama-2-70b": 0.15, "mixtral-8x7b": 0.25, "wizardlm-13b": 0.20, "codellama-34b": 0.15,
           "mistral-7b": 0.25}
CODE_MODELS = {"codellama-34b"}
FUSER = "llama-2-70b"
SUMMARISER, GRADER = "vicuna-13b-v1.5", "llama-2-70b"
INSTRUCTION = 64  # tokens of a dependent's own template ("Merge these answers ...", "Grade ...")

App = tuple[dict[str, ModelSpec], dict[str, list[SimRequest]]]


class LengthSource:
    """(prompt, output) length pairs of a trace kind ("conversation" / "code")."""

    def __init__(self, data: Path | None) -> None:
        self.rows: dict[str, np.ndarray] = {}
        if data is not None:
            for kind, name in (("conversation", "splitwise_conv.csv"), ("code", "splitwise_code.csv")):
                with open(Path(data) / "traces" / name) as f:
                    r = csv.DictReader(f)
                    self.rows[kind] = np.array([(int(x["num_prefill_tokens"]), int(x["num_decode_tokens"]))
                                                for x in r], dtype=np.int64)

    def draw(self, kind: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if kind in self.rows:
            rows = self.rows[kind][rng.integers(0, len(self.rows[kind]), n)]
            return rows[:, 0], rows[:, 1]
        q_in, q_out = prior_quantiles(kind, "prefill"), prior_quantiles(kind, "decode")
        return q_in[rng.integers(0, len(q_in), n)], q_out[rng.integers(0, len(q_out), n)]


def _requests(spec: ModelSpec, prompts: np.ndarray, outs: np.ndarray, max_tokens: int) -> list[SimRequest]:
    cap_room = max(1, spec.max_model_len - max_tokens)
    reqs = []
    for i, (p, o) in enumerate(zip(prompts, outs)):
        p = int(max(1, min(p, cap_room)))
        o = int(max(1, min(o, max_tokens, spec.max_model_len - p)))
        reqs.append(SimRequest(i, p, o))
    return reqs


def _spec(name: str) -> ModelSpec:
    # vLLM's A100 engine defaults; long-context models capped at 8k (every request fits)
    base = paper_model_spec(name)
    return paper_model_spec(name, max_num_seqs=256, max_num_batched_tokens=8192,
                            max_model_len=min(base.max_model_len, 8192))


def ensembling(n_prompts: int, lengths: LengthSource, seed: int = 0, max_tokens: int = 512,
               models: list[str] = ENSEMBLE) -> tuple[dict[str, ModelSpec], dict[str, list[SimRequest]]]:
    rng = np.random.default_rng([seed, 1])
    prompts, _ = lengths.draw("conversation", n_prompts, rng)
    specs, work = {}, {}
    for m in models:
        spec = _spec(m)
        _, outs = lengths.draw("conversation", n_prompts, rng)  # each model answers differently
        specs[spec.name], work[spec.name] = spec, _requests(spec, prompts, outs, max_tokens)
    return specs, work


def routing(n_requests: int, lengths: LengthSource, seed: int = 0, max_tokens: int = 4096
            ) -> tuple[dict[str, ModelSpec], dict[str, list[SimRequest]]]:
    rng = np.random.default_rng([seed, 2])
    specs, work = {}, {}
    for m, share in ROUTING.items():
        spec = _spec(m)
        n = int(round(n_requests * share))
        prompts, outs = lengths.draw("code" if m in CODE_MODELS else "conversation", n, rng)
        specs[spec.name], work[spec.name] = spec, _requests(spec, prompts, outs, max_tokens)
    return specs, work


def ensemble_fuser(n_prompts: int, lengths: LengthSource, seed: int = 0, max_tokens: int = 512,
                   models: list[str] = ENSEMBLE, fuser: str = FUSER) -> App:
    """`ensembling` plus one `fuser` request per prompt that waits for every model's answer."""
    if fuser in models:
        raise ValueError(f"the fuser {fuser!r} is one of the generators (rids would collide)")
    specs, work = ensembling(n_prompts, lengths, seed, max_tokens, models)
    gens = list(work)  # the generators' canonical names
    spec = _spec(fuser)
    _, outs = lengths.draw("conversation", n_prompts, np.random.default_rng([seed, 3]))
    own = np.array([r.prompt_len for r in work[gens[0]]]) + INSTRUCTION
    work[spec.name] = [dataclasses.replace(r, upstream=tuple((g, r.rid) for g in gens))
                       for r in _requests(spec, own, outs, max_tokens)]
    specs[spec.name] = spec
    return specs, work


def chain_summary(n_docs: int, lengths: LengthSource, seed: int = 0, chunks: tuple[int, int] = (2, 8),
                  chunk_tokens: int = 2048, max_tokens: int = 900, grades: int = 1,
                  grade_max_tokens: int = 256, summariser: str = SUMMARISER,
                  grader: str = GRADER) -> App:
    """Per document a chain of summaries (each waits for the previous one), then `grades` grader
    requests on the last summary. Summary lengths: the conversation trace's outputs, capped."""
    rng = np.random.default_rng([seed, 4])
    s_spec, g_spec = _spec(summariser), _spec(grader)
    if s_spec.name == g_spec.name:
        raise ValueError("the summariser and the grader must differ (rids would collide)")
    k = rng.integers(chunks[0], chunks[1] + 1, n_docs)
    _, s_outs = lengths.draw("conversation", int(k.sum()), rng)
    _, g_outs = lengths.draw("conversation", n_docs * grades, rng)
    summaries = _requests(s_spec, np.full(int(k.sum()), chunk_tokens + INSTRUCTION), s_outs, max_tokens)
    grading = _requests(g_spec, np.full(n_docs * grades, INSTRUCTION), g_outs, grade_max_tokens)
    s_work, g_work, first = [], [], 0
    for d, n in enumerate(k.tolist()):
        for i in range(first, first + n):
            ups = ((s_spec.name, i - 1),) if i > first else ()
            s_work.append(dataclasses.replace(summaries[i], upstream=ups))
        first += n
        g_work += [dataclasses.replace(g, upstream=((s_spec.name, first - 1),))
                   for g in grading[d * grades:(d + 1) * grades]]
    return ({s_spec.name: s_spec, g_spec.name: g_spec}, {s_spec.name: s_work, g_spec.name: g_work})


def union(*apps: App) -> App:
    """Several applications as one: each model's requests of every application (rids, and the
    upstream references to them, shifted past the earlier applications' rids of that model)."""
    specs: dict[str, ModelSpec] = {}
    work: dict[str, list[SimRequest]] = {}
    for a_specs, a_work in apps:
        shift = {m: len(work.get(m, ())) for m in a_work}
        for m, reqs in a_work.items():
            specs.setdefault(m, a_specs[m])
            work.setdefault(m, []).extend(
                dataclasses.replace(r, rid=r.rid + shift[m],
                                    upstream=tuple((u, rid + shift[u]) for u, rid in r.upstream))
                for r in reqs)
    return specs, work


def gpu_pool(gpu: str, count: int, pairs: bool = True) -> DevicePool:
    ids = tuple(range(count))
    groups = tuple(ids[i:i + 2] for i in range(0, count, 2)) if pairs else ()
    return DevicePool(gpu, ids, 80 * GiB, groups)


def gpu_latency(gpu: str):
    def lat(spec: ModelSpec, tp: int) -> LatencyModel:
        m = gpu_latency_model(spec, tp, gpu)
        return m if m.load_time_s > 0 else m.with_load_time(gpu_load_time_s(spec, tp, gpu))

    return lat


def problem(specs: dict[str, ModelSpec], work: dict[str, list[SimRequest]], pool: DevicePool,
            gpu: str = "a100", **kw) -> PlanningProblem:
    return PlanningProblem(specs, work, pool, gpu_latency(gpu),
                           lambda s, tp: gpu_kv_bytes_per_rank(s, tp, pool.memory_bytes), **kw)
