"""bench/apps.py's application files, without engines: every shape validates as the gateway
validates a batch (the whole file and each level's file), stays within the demo models' context
with its upstream outputs in, and splits into the topological levels a user uploads in turn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.apps import APPS, CAPS, App, Source, level_requests, levels, make_app, read_outputs
from bench.demo_setup import CHAT, MAX_MODEL_LEN, MODELS, word_tokens, write_jsonl
from bench.paper_workloads import (ENSEMBLE, FUSER, GRADER, SUMMARISER, LengthSource,
                                   chain_summary, ensemble_fuser, gpu_pool, problem, union)
from gateway.tokens import TokenCounter
from gateway.validation import validate_file
from scheduler.planner import STRATEGIES, Planner
from runtime.placeholders import placeholder_ids

WORDS = ["the", "of", "and", "to"]  # one token each with a leading space (`word_tokens`)


def app_reqs(name: str, n: int = 4, chunks: int = 3) -> list[dict]:
    a = APPS[name]
    src = Source(None, WORDS, np.random.default_rng(0))  # the shipped prior tables
    return make_app(App(a.shape, a.upstream, a.downstream, n), src, chunks)


def test_the_words_are_one_token_each(tiny_model_dir):
    assert set(WORDS) <= set(word_tokens(tiny_model_dir / "tiny-a"))


@pytest.mark.parametrize("name", sorted(APPS))
def test_every_placeholder_is_declared_and_every_model_is_a_demo_model(name):
    reqs = app_reqs(name)
    ids = {r["custom_id"] for r in reqs}
    assert len(ids) == len(reqs)
    for r in reqs:
        assert r["body"]["model"] in MODELS and r["body"]["ignore_eos"]
        deps = r.get("depends_on") or []
        assert set(deps) <= ids
        assert set(placeholder_ids(r["body"], r["url"])) == set(deps)


def test_levels_of_each_shape():
    ens = levels(app_reqs("ensemble", n=5))
    assert [len(x) for x in ens] == [15, 5]
    assert {r["body"]["model"] for r in ens[1]} == {"medium"}
    ch = levels(app_reqs("chain", n=2, chunks=4))
    assert [len(x) for x in ch] == [2, 2, 2, 2, 2]
    assert [r["custom_id"] for r in ch[3]] == ["doc0-3", "doc1-3"]
    assert [r["custom_id"] for r in ch[4]] == ["grade-0", "grade-1"]
    assert [len(x) for x in levels(app_reqs("judge", n=3))] == [9, 9]


def test_levels_do_not_depend_on_file_order():
    reqs = app_reqs("chain", n=1, chunks=3)
    assert [[r["custom_id"] for r in lv] for lv in levels(reqs[::-1])] == [
        ["doc0-0"], ["doc0-1"], ["doc0-2"], ["grade-0"]]


def test_a_level_file_has_the_outputs_filled_in_and_no_depends_on():
    reqs = app_reqs("ensemble", n=1)
    outputs = {r["custom_id"]: f"<answer of {r['custom_id']}>" for r in levels(reqs)[0]}
    (fuse,) = level_requests(levels(reqs)[1], outputs)
    assert "depends_on" not in fuse
    text = fuse["body"]["messages"][0]["content"]
    assert all(o in text for o in outputs.values()) and "{{" not in text
    assert "{{" in reqs[-1]["body"]["messages"][0]["content"]  # the original is not changed


def test_read_outputs():
    line = {"custom_id": "a", "response": {"status_code": 200, "body": {
        "choices": [{"message": {"role": "assistant", "content": "hi"}}]}}}
    assert read_outputs(json.dumps(line) + "\n\n") == {"a": "hi"}


@pytest.mark.parametrize("name", sorted(APPS))
def test_prompts_fit_the_context_with_upstream_outputs_at_1_3_tokens_each(name):
    """Own words are one token each (`bench.demo_setup.word_tokens`); an upstream output of k tokens
    re-tokenizes to at most ~1.3 k; chat template and instruction words: 64 more at most."""
    reqs = app_reqs(name, n=16)
    out = {r["custom_id"]: r["body"]["max_tokens"] for r in reqs}
    for r in reqs:
        own = len(r["body"]["messages"][0]["content"].split())
        ups = sum(out[u] for u in r.get("depends_on") or [])
        assert own + 1.3 * ups + 64 + r["body"]["max_tokens"] <= MAX_MODEL_LEN, r["custom_id"]
    assert max(o for o in out.values()) <= max(o for _, o in CAPS.values())


def test_source_is_deterministic():
    assert app_reqs("judge") == app_reqs("judge")


@pytest.mark.parametrize("name", ["ensemble", "chain", "judge"])
def test_the_files_and_their_level_files_validate_as_the_gateway_validates_them(
        name, test_config, tmp_path: Path):
    """With the test models (medium's lines on small: the same tokenizer, the same context)."""
    tokens = TokenCounter(test_config)
    reqs = [r | {"body": r["body"] | {"model": "small"}} if r["body"]["model"] == "medium" else r
            for r in app_reqs(name)]
    files = [reqs] + [level_requests(lv, {}) for lv in levels(reqs)]
    for i, lines in enumerate(files):
        path = write_jsonl(tmp_path / f"{i}.jsonl", lines)
        result = validate_file(path, CHAT, test_config, tokens)
        assert result.ok and len(result.items) == len(lines), result.errors[:3]


# ---------------------------------------------------------------------------------------------
# the paper-scale applications (bench/paper_workloads.py): SimRequests with upstream references

def test_paper_ensemble_fuser_waits_for_every_generator():
    specs, work = ensemble_fuser(5, LengthSource(None), models=ENSEMBLE[:3])
    gens = [m for m in work if m != FUSER]
    assert len(gens) == 3 and set(specs) == set(work)
    assert [r.upstream for r in work[FUSER]] == [tuple((g, i) for g in gens) for i in range(5)]
    assert all(not r.upstream for g in gens for r in work[g])


def test_paper_chain_links_each_document_and_grades_its_last_summary():
    specs, work = chain_summary(4, LengthSource(None), chunks=(2, 3), grades=2)
    summ = work[SUMMARISER]
    heads = [r.rid for r in summ if not r.upstream]
    assert len(heads) == 4
    for r in summ:
        assert r.upstream in ((), ((SUMMARISER, r.rid - 1),))
    lasts = [h - 1 for h in heads[1:]] + [len(summ) - 1]
    assert [r.upstream for r in work[GRADER]] == [((SUMMARISER, i),) for i in lasts for _ in (0, 1)]
    assert all(r.prompt_len + 900 + r.output_len <= specs[SUMMARISER].max_model_len for r in summ)


def test_paper_union_renumbers_rids_per_model_and_their_references():
    a = chain_summary(2, LengthSource(None), chunks=(2, 2))
    b = chain_summary(3, LengthSource(None), chunks=(2, 2), seed=1)
    _, work = union(a, b)
    rids = [r.rid for r in work[SUMMARISER]]
    assert rids == list(range(10))
    assert [r.upstream for r in work[SUMMARISER]][4:6] == [(), ((SUMMARISER, 4),)]
    assert work[GRADER][2].upstream == ((SUMMARISER, 5),)


def test_paper_apps_plan_under_every_app_strategy():
    if "level-by-level" not in STRATEGIES:
        pytest.skip("the planner has no level-by-level strategy yet")
    specs, work = union(ensemble_fuser(6, LengthSource(None), models=ENSEMBLE[:2]),
                        chain_summary(3, LengthSource(None), chunks=(2, 3)))
    planner = Planner(problem(specs, work, gpu_pool("a100", 4)))
    ours = planner.plan("samullm").makespan_s
    for s in ("level-by-level", "sequential"):
        assert 0 < ours <= planner.plan(s).makespan_s * (1 + 1e-9)
