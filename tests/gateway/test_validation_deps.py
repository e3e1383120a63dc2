"""`depends_on` at batch creation: every rule with its code, 1-based line and param; what a valid
dependent line becomes (`WorkItem.depends_on`, prompt tokens of its own text); long chains and
cycles; and, through the SDK, a batch failing on a cycle like on any other validation error."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from gateway.tokens import TokenCounter
from gateway.validation import ValidationResult, validate_file
from runtime.config import ConfigError, parse_config
from runtime.executor_api import WorkItem

from .conftest import chat_line, jsonl, plan_only_config, poll, running

CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"


def _validate(tmp_path: Path, lines: list[Any], endpoint: str = CHAT,
              **limits: Any) -> ValidationResult:
    cfg = plan_only_config(tmp_path / "state", **limits)
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl(lines))
    return validate_file(path, endpoint, cfg, TokenCounter(cfg))


def _errors(res: ValidationResult) -> list[tuple[str, int | None, str | None]]:
    assert all(e["message"] for e in res.errors)
    assert res.error_count == len(res.errors)
    return [(e["code"], e["line"], e["param"]) for e in res.errors]


def dep(cid: str, deps: Any, text: str = "judge", **body: Any) -> dict[str, Any]:
    line = chat_line(cid, text=text, **body)
    line["depends_on"] = deps
    return line


def completion(cid: str, prompt: Any, deps: Any = None) -> dict[str, Any]:
    line = {"custom_id": cid, "method": "POST", "url": COMPLETIONS,
            "body": {"model": "tiny-a", "prompt": prompt, "max_tokens": 8}}
    if deps is not None:
        line["depends_on"] = deps
    return line


A = chat_line("a")
CASES = [
    # (name, lines, endpoint, [(code, line, param)])
    ("not a list", [A, dep("b", "a")], CHAT, [("invalid_depends_on", 2, "depends_on")]),
    ("an object", [A, dep("b", {"a": 1})], CHAT, [("invalid_depends_on", 2, "depends_on")]),
    ("an item not a string", [A, dep("b", ["a", 7])], CHAT,
     [("invalid_depends_on", 2, "depends_on[1]")]),
    ("an empty id", [A, dep("b", [""])], CHAT, [("invalid_depends_on", 2, "depends_on[0]")]),
    ("unknown id", [A, dep("b", ["a", "zz"]), chat_line("c")], CHAT,
     [("unknown_dependency", 2, "depends_on")]),
    ("itself", [A, dep("b", ["a", "b"])], CHAT, [("self_dependency", 2, "depends_on[1]")]),
    ("two in a cycle", [A, dep("b", ["c"]), dep("c", ["b"])], CHAT,
     [("dependency_cycle", 2, "depends_on")]),
    ("a cycle and a line waiting on it", [dep("w", ["y"]), dep("x", ["z"]), dep("y", ["x"]),
                                          dep("z", ["y"])], CHAT,
     [("dependency_cycle", 2, "depends_on")]),
    ("two cycles", [dep("a", ["b"]), dep("b", ["a"]), A | {"custom_id": "c"}, dep("d", ["e"]),
                    dep("e", ["f"]), dep("f", ["d"])], CHAT,
     [("dependency_cycle", 1, "depends_on"), ("dependency_cycle", 4, "depends_on")]),
    ("a placeholder of an unlisted id", [A, chat_line("c"), dep("b", ["a"], "{{a}} vs {{c}}")],
     CHAT, [("undeclared_dependency", 3, "body.messages")]),
    ("... of a later line", [A, dep("b", ["a"], "{{a}} vs {{c}}"), chat_line("c")], CHAT,
     [("undeclared_dependency", 2, "body.messages")]),
    ("... in a text part", [A, chat_line("c"), dep("b", ["a"], [
        {"type": "text", "text": "{{a}}"}, {"type": "text", "text": "and {{c}}"}])], CHAT,
     [("undeclared_dependency", 3, "body.messages")]),
    ("... in a completions prompt", [completion("a", "q"), completion("c", "q"),
                                     completion("b", ["{{a}}", "{{c}}"], ["a"])], COMPLETIONS,
     [("undeclared_dependency", 3, "body.prompt")]),
    ("too many", [A, chat_line("c"), chat_line("d"), dep("b", ["a", "c", "d"])], CHAT,
     [("too_many_dependencies", 4, "depends_on")]),
    ("an embeddings line", [{"custom_id": "e1", "method": "POST", "url": EMBEDDINGS,
                             "body": {"model": "embedder", "input": "x"}},
                            {"custom_id": "e2", "method": "POST", "url": EMBEDDINGS,
                             "depends_on": ["e1"], "body": {"model": "embedder", "input": "x"}}],
     EMBEDDINGS, [("embeddings_dependency", 2, "depends_on")]),
    ("each line one rule, the file's rules after the stream",
     [dep("a", ["nope"]), dep("b", 3), dep("c", ["d"]), dep("d", ["c"]), dep("e", ["e"])], CHAT,
     [("invalid_depends_on", 2, "depends_on"), ("self_dependency", 5, "depends_on[0]"),
      ("unknown_dependency", 1, "depends_on"), ("dependency_cycle", 3, "depends_on")]),
]


@pytest.mark.parametrize("name,lines,endpoint,expected", CASES, ids=[c[0] for c in CASES])
def test_rule(tmp_path, name, lines, endpoint, expected):
    res = _validate(tmp_path, lines, endpoint, max_dependencies=2)
    assert _errors(res) == expected


def test_messages_name_the_ids(tmp_path):
    res = _validate(tmp_path, [A, dep("b", ["a", "ghost-1", "ghost-2"]), dep("s", ["s"])])
    assert "'s'" in res.errors[0]["message"]  # the stream's errors come first
    assert "'ghost-1', 'ghost-2'" in res.errors[1]["message"]
    res = _validate(tmp_path, [A, chat_line("c"), dep("b", ["a"], "{{c}} {{c}} {{a}} {{zz}}")])
    (err,) = res.errors
    assert "'c'" in err["message"] and "'zz'" not in err["message"]


def test_a_cycle_is_named_from_its_first_line(tmp_path):
    res = _validate(tmp_path, [A, dep("x", ["z"]), dep("y", ["x"]), dep("z", ["y"])])
    (err,) = res.errors
    assert (err["code"], err["line"]) == ("dependency_cycle", 2)
    assert "'x' (line 2) -> 'z' (line 4) -> 'y' (line 3) -> back to the first" in err["message"]


def test_valid_dependencies_become_work_items(tmp_path):
    lines = [dep("b", ["a", "c", "a"], "{{a}} and {{c}}"),  # a forward reference, a repeat
             A, chat_line("c"), dep("d", []), dep("e", None), dep("f", ["b"], "no placeholder")]
    res = _validate(tmp_path, lines)
    assert res.ok, res.errors
    assert [it.depends_on for it in res.items] == [("a", "c"), (), (), (), (), ("b",)]
    b = res.items[0]
    assert "depends_on=('a', 'c')" in repr(b) and "depends_on" not in repr(res.items[1])
    assert b.body == lines[0]["body"]  # sent as written: the executor fills the placeholders in


def test_prompt_tokens_are_the_templates_own(tmp_path):
    long_id = "x" * 6000  # its placeholder alone is ~1,500 tokens: over the 1,024 context
    lines = [chat_line(long_id), dep("b", [long_id], f"Answer: {{{{{long_id}}}}} grade",
                                     max_tokens=None)]
    res = _validate(tmp_path, lines)
    assert res.ok, res.errors
    same = _validate(tmp_path, [chat_line("b", text="Answer:  grade", max_tokens=None)]).items[0]
    b = res.items[1]
    assert (b.prompt_tokens, b.max_tokens) == (same.prompt_tokens, same.max_tokens)
    # without depends_on the placeholder is text, and counts
    res = _validate(tmp_path, [chat_line(long_id), chat_line("b", text=lines[1]["body"]["messages"]
                                                             [0]["content"], max_tokens=None)])
    assert _errors(res) == [("context_length_exceeded", 2, "body.messages")]


def test_a_placeholder_of_no_request_is_literal_text(tmp_path):
    res = _validate(tmp_path, [A, dep("b", ["a"], "{{a}} {{not-an-id}} {{b}}x")])
    # `{{b}}` is the line's own id, not listed: an error; a placeholder of no request is text
    assert _errors(res) == [("undeclared_dependency", 2, "body.messages")]
    res = _validate(tmp_path, [A, dep("b", ["a"], "{{a}} {{not-an-id}} {{")])
    assert res.ok
    assert res.items[1].prompt_tokens == _validate(
        tmp_path, [chat_line("b", text=" {{not-an-id}} {{")]).items[0].prompt_tokens


def test_lines_without_depends_on_are_read_as_before(tmp_path):
    """`{{a}}` in a line with no `depends_on` is text, even when `a` is a custom_id."""
    res = _validate(tmp_path, [A, chat_line("b", text="{{a}}"), completion("c", "{{a}}")])
    assert _errors(res) == [("url_mismatch", 3, "url")]
    assert [it.depends_on for it in res.items] == [(), ()]


def test_ids_with_braces_and_other_characters(tmp_path):
    ids = ["{a", "a.*+?[](){", "ответ 😀", 'q"uote\\', "a}"]
    lines = [chat_line(c) for c in ids]
    lines.append(dep("j", ids, " ".join("{{" + c + "}}" for c in ids[:-1])))  # "a}": order only
    res = _validate(tmp_path, lines, max_dependencies=8)
    assert res.ok, res.errors
    assert res.items[-1].depends_on == tuple(ids)
    assert res.items[-1].prompt_tokens == _validate(
        tmp_path, [chat_line("j", text="    ")]).items[0].prompt_tokens


def test_a_dependency_on_a_failed_line_reports_only_that_line(tmp_path):
    res = _validate(tmp_path, [chat_line("a", model="gpt-9"), dep("b", ["a"], "{{a}}")])
    assert _errors(res) == [("model_not_found", 1, "body.model")]


def test_repeats_count_once_against_the_limit(tmp_path):
    res = _validate(tmp_path, [A, chat_line("c"), dep("b", ["a", "c", "a", "c"])],
                    max_dependencies=2)
    assert res.ok and res.items[2].depends_on == ("a", "c")


def test_an_empty_list_on_embeddings_is_no_dependency(tmp_path):
    line = {"custom_id": "e", "method": "POST", "url": EMBEDDINGS, "depends_on": [],
            "body": {"model": "embedder", "input": "x"}}
    assert _validate(tmp_path, [line], EMBEDDINGS).ok


def test_the_limit_defaults_to_64_and_must_be_positive(tmp_path):
    many = [chat_line(f"r{i}") for i in range(65)]
    res = _validate(tmp_path, many + [dep("x", [f"r{i}" for i in range(64)])])
    assert res.ok
    res = _validate(tmp_path, many + [dep("x", [f"r{i}" for i in range(65)])])
    assert _errors(res) == [("too_many_dependencies", 66, "depends_on")]
    with pytest.raises(ConfigError, match="limits.max_dependencies"):
        parse_config({"limits": {"max_dependencies": 0}})


def _chain(path: Path, n: int, cycle: bool) -> None:
    with open(path, "w") as f:
        for i in range(n):
            line = chat_line(f"r{i}", text=f"step {i}: {{{{r{i - 1}}}}}" if i else "start")
            if i or cycle:
                line["depends_on"] = [f"r{(i - 1) % n}"]
            f.write(json.dumps(line) + "\n")


def test_a_long_chain_and_a_long_cycle(tmp_path):
    """50,000 links: deeper than any recursion limit; linear, not quadratic."""
    cfg = plan_only_config(tmp_path / "state")
    path = tmp_path / "chain.jsonl"
    _chain(path, 50_000, cycle=False)
    t = time.perf_counter()
    res = validate_file(path, CHAT, cfg, TokenCounter(cfg))
    took = time.perf_counter() - t
    assert res.ok and len(res.items) == 50_000
    assert res.items[-1].depends_on == ("r49998",)
    assert took < 10  # ~0.5 s here; quadratic would be hours
    _chain(path, 50_000, cycle=True)
    res = validate_file(path, CHAT, cfg, TokenCounter(cfg))
    assert _errors(res) == [("dependency_cycle", 1, "depends_on")]
    assert "(50000 requests in all)" in res.errors[0]["message"]


def test_work_item_keeps_its_old_constructor():
    old = WorkItem(3, "c", "m", CHAT, {"x": 1}, 5, 6)
    assert old.depends_on == () and "depends_on" not in repr(old)
    new = WorkItem(3, "c", "m", CHAT, {"x": 1}, 5, 6, depends_on=("a",))
    assert new != old and new == WorkItem(3, "c", "m", CHAT, {"x": 1}, 5, 6, depends_on=("a",))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(tmp_path_factory):
    async with running(plan_only_config(tmp_path_factory.mktemp("deps"))) as srv:
        yield srv


@pytest.mark.asyncio(loop_scope="session")
async def test_through_the_api(server):
    client = server.client()
    f = await client.files.create(file=("in.jsonl", jsonl([A, dep("b", ["c"]), dep("c", ["b"])])),
                                  purpose="batch")
    b = await client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    done = await poll(client, b.id)
    assert done.status == "failed"
    assert [(e.code, e.line, e.param) for e in done.errors.data] == [
        ("dependency_cycle", 2, "depends_on")]
    assert b.id not in server.executor.submitted
    f = await client.files.create(file=("in.jsonl", jsonl([A, dep("b", ["a"], "{{a}}")])),
                                  purpose="batch")
    b = await client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    assert (await poll(client, b.id)).status == "completed"
    assert [it.depends_on for it in server.executor.submitted[b.id]] == [(), ("a",)]


def _reach(edges: dict[int, list[int]], start: int) -> set[int]:
    seen, todo = set(), list(edges[start])
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo.extend(edges[v])
    return seen


@pytest.mark.parametrize("seed", range(40))
def test_random_graphs_report_only_real_cycles_and_every_one(tmp_path, seed):
    """Against a brute-force reference: a reported line is on a cycle, and every line on a cycle is
    a reported one or depends (transitively) on one; no cycle, no report."""
    rng = random.Random(seed)
    n = rng.randint(2, 60)
    degrees = [min(n - 1, rng.choice([0, 0, 0, 1, 1, 1, 2, 3])) for _ in range(n)]
    edges = {i: rng.sample([j for j in range(n) if j != i], degrees[i]) for i in range(n)}
    lines = [dep(f"n{i}", [f"n{j}" for j in edges[i]]) for i in range(n)]
    res = _validate(tmp_path, lines, max_dependencies=4)
    assert {e["code"] for e in res.errors} <= {"dependency_cycle"}
    reported = {e["line"] - 1 for e in res.errors}
    reach = {i: _reach(edges, i) for i in range(n)}
    on_cycle = {i for i in range(n) if i in reach[i]}
    assert reported <= on_cycle
    assert all(i in reported or reach[i] & reported for i in on_cycle)
    assert bool(on_cycle) == bool(reported)


@pytest.mark.parametrize("seed", range(20))
def test_hostile_depends_on_never_raises(tmp_path, seed):
    """Whatever `depends_on` and the prompt hold, every problem is a line error."""
    rng = random.Random(seed)
    ids = [f"r{i}" for i in range(30)] + ["{a", "a}", "{{", "}}", "ü"]
    values = [None, [], 5, "r1", {"r1": 1}, [None], [[]], ["r1", 7], [""]]

    def text() -> str:
        return "".join(rng.choice(["{{", "}}", "{", "}", "x", " ", "{{" + rng.choice(ids) + "}}"])
                       for _ in range(rng.randint(0, 12)))

    lines: list[Any] = []
    for cid in ids:
        deps = rng.choice(values) if rng.random() < 0.3 else rng.sample(ids, rng.randint(0, 4))
        if rng.random() < 0.2:
            lines.append(completion(cid, rng.choice([text(), [text(), text()], [1, 2]]), deps))
        else:
            content = rng.choice([text(), [{"type": "text", "text": text()}], None, 5])
            lines.append(dep(cid, deps, **{"messages": [{"role": "user", "content": content}]}))
    res = _validate(tmp_path, lines, rng.choice([CHAT, COMPLETIONS]), max_dependencies=3)
    assert all(isinstance(e["line"], int) and e["message"] for e in res.errors)
    assert "invalid_request" not in {e["code"] for e in res.errors}  # no rule raised
