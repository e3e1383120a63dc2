"""Shared prompt prefixes found at validation (`gateway.prefixes`, `WorkItem.prefix`): a system prompt
over every line is one interned chain of its blocks, unrelated lines share nothing, a dependent
line's prefix ends at its first placeholder, two models never share, and the first line of a group
(hashed only by its first block until a second line starts like it) gets its full chain."""

from __future__ import annotations

import random
from array import array
from pathlib import Path
from typing import Any

from gateway.prefixes import PrefixIndex, chain, prompt_text, shared_prefixes
from gateway.tokens import TokenCounter
from gateway.validation import validate_file

from .conftest import chat_line, jsonl, plan_only_config

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
SYSTEM = "You are a careful grader. Answer with one number from 1 to 10. " * 20  # 1,260 chars


def _items(tmp_path: Path, lines: list[Any], endpoint: str = CHAT) -> list[Any]:
    cfg = plan_only_config(tmp_path / "state")
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl(lines))
    res = validate_file(path, endpoint, cfg, TokenCounter(cfg))
    assert res.ok, res.errors
    return res.items


def _sys_line(cid: str, user: str, model: str = "tiny-a") -> dict[str, Any]:
    line = chat_line(cid, model, user)
    line["body"]["messages"].insert(0, {"role": "system", "content": SYSTEM})
    return line


def test_a_system_prompt_over_every_line_is_one_shared_chain(tmp_path: Path) -> None:
    items = _items(tmp_path, [_sys_line(f"r{i}", f"{i}: a question") for i in range(6)])
    # chars/4 without weights: a block is 64 characters; up to the first digit 1,273: 19 blocks
    assert {len(it.prefix) for it in items} == {19}
    assert all(it.prefix is items[0].prefix for it in items)  # interned, not copied per line


def test_unrelated_lines_share_nothing(tmp_path: Path) -> None:
    rng = random.Random(3)
    words = "alpha beta gamma delta kappa omega river cloud".split()
    lines = [chat_line(f"r{i}", text=" ".join(rng.choice(words) for _ in range(60)))
             for i in range(20)]
    assert all(it.prefix == () for it in _items(tmp_path, lines))


def test_lines_share_exactly_their_common_blocks(tmp_path: Path) -> None:
    doc = "".join(chr(0x41 + i % 26) for i in range(64 * 5))  # 5 blocks of text
    lines = [chat_line("a", text=doc + "first question"), chat_line("b", text=doc + "second one"),
             chat_line("c", text=doc[:64 * 2] + "z" * 200)]
    a, b, c = _items(tmp_path, lines)
    # "user\0" (5 chars) comes first: the doc's text fills blocks 0..4 and 5 chars of block 5
    assert len(a.prefix) == len(b.prefix) == 5
    assert a.prefix == b.prefix
    assert len(c.prefix) == 2 and c.prefix == a.prefix[:2]


def test_two_models_never_share(tmp_path: Path) -> None:
    items = _items(tmp_path, [_sys_line("a", "q1", "tiny-a"), _sys_line("b", "q2", "tiny-b")])
    assert [it.prefix for it in items] == [(), ()]


def test_a_dependent_prefix_ends_at_its_first_placeholder(tmp_path: Path) -> None:
    template = "Grade the answer below for correctness and style. " * 6  # 306 chars
    lines = [chat_line("q1"), chat_line("q2")]
    for i in (1, 2):
        line = chat_line(f"j{i}", text=template + "{{q%d}} and more words after it" % i)
        line["depends_on"] = [f"q{i}"]
        lines.append(line)
    items = _items(tmp_path, lines)
    j1, j2 = items[2], items[3]
    assert len(j1.prefix) == (len("user\x00") + len(template)) // 64 == 4
    assert j1.prefix == j2.prefix
    text = prompt_text(lines[2]["body"], CHAT, ("q1",))
    assert text == "user\x00" + template


def test_completions_prompt_strings_are_chained_token_ids_are_not(tmp_path: Path) -> None:
    def line(cid: str, prompt: Any) -> dict[str, Any]:
        return {"custom_id": cid, "method": "POST", "url": COMPLETIONS,
                "body": {"model": "tiny-a", "prompt": prompt, "max_tokens": 4}}
    items = _items(tmp_path, [line("a", SYSTEM + "one"), line("b", SYSTEM + "two"),
                              line("c", [1, 2, 3] * 100), line("d", [1, 2, 3] * 100)], COMPLETIONS)
    assert len(items[0].prefix) == len(SYSTEM) // 64 and items[0].prefix == items[1].prefix
    assert items[2].prefix == items[3].prefix == ()


def test_the_first_line_of_a_group_is_read_back_for_its_full_chain() -> None:
    texts = {"x": "p" * 640 + "x", "y": "p" * 640 + "y", "z": "q" * 640}
    reads: list[str] = []
    index = PrefixIndex(lambda k: reads.append(k) or texts[k])
    for k in "xzy":
        index.add(k, "m", texts[k], 4.0)
    assert reads == ["x"]  # only x, when y starts like it; z has no partner
    got = dict(index.shared())
    assert set(got) == {"x", "y"} and got["x"] == got["y"] and len(got["x"]) == 10


def test_shared_prefixes_is_the_longest_common_prefix_with_any_other_chain() -> None:
    rng = random.Random(7)
    chains = [array("q", [rng.choice((1, 2)) for _ in range(rng.randint(0, 6))]) for _ in range(40)]
    # as hash chains: element k names elements 0..k
    chains = [array("q", [hash(tuple(c[:k + 1])) for k in range(len(c))]) for c in chains]
    got = shared_prefixes(chains)
    for i, c in enumerate(chains):
        best = 0
        for j, d in enumerate(chains):
            if i != j:
                k = 0
                while k < min(len(c), len(d)) and c[k] == d[k]:
                    k += 1
                best = max(best, k)
        assert got[i] == tuple(c[:best])


def test_chain_is_deterministic_per_model_and_text() -> None:
    assert chain("m", "a" * 200, 4.0) == chain("m", "a" * 200 + "tail", 4.0)
    assert chain("m", "a" * 200, 4.0) != chain("n", "a" * 200, 4.0)
    assert len(chain("m", "a" * 200, 4.0)) == 3
