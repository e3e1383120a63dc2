"""Placeholders: the syntax (ids with braces, regex characters, Unicode), which texts of a body hold
them, exact one-pass substitution that never changes its input, and a response's generated text."""

from __future__ import annotations

import copy
import time

import orjson
import pytest

from runtime.placeholders import (generated_text, nameable, placeholder, placeholder_ids, spans,
                                  substitute, template)

CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"


def _chat(*contents: object) -> dict:
    return {"model": "m", "max_tokens": 8,
            "messages": [{"role": "user", "content": c} for c in contents]}


def _text(body: dict, i: int = 0) -> str:
    return body["messages"][i]["content"]


TRICKY_IDS = ["ans-7-small", "a.*+?[]()|^$\\d", "{a", "a{{b", "a}b", "ответ-7 ü 😀", "line\nbreak",
              'quote"s', "x" * 5000, "{", "{0}%s"]


@pytest.mark.parametrize("cid", TRICKY_IDS, ids=lambda c: repr(c)[:20])
def test_a_nameable_id_reads_back_from_its_placeholder(cid):
    assert nameable(cid)
    text = f"before {placeholder(cid)} after"
    assert [s[2] for s in spans(text)] == [cid]
    assert substitute(_chat(text), CHAT, {cid: "OUT"}) == _chat("before OUT after")


@pytest.mark.parametrize("cid", ["a}", "a}}b", "}}", "}"])
def test_an_id_ending_in_a_brace_or_holding_the_closer_is_not_nameable(cid):
    assert not nameable(cid)
    assert [s[2] for s in spans(placeholder(cid))] != [cid]  # its first `}}` ends it early
    assert substitute(_chat(placeholder(cid)), CHAT, {cid: "OUT"}) == _chat(placeholder(cid))


def test_spans_read_left_to_right_to_the_first_closer():
    text = "{{a}} {{{b}} {{c {{d}} e}} {{unclosed"
    assert list(spans(text)) == [(0, 5, "a"), (6, 12, "{b"), (13, 22, "c {{d")]
    assert [text[s:e] for s, e, _ in spans(text)] == ["{{a}}", "{{{b}}", "{{c {{d}}"]
    assert list(spans("}} {{ no closer after")) == []
    assert list(spans("{{}}")) == [(0, 4, "")]  # empty: never a custom_id, stays literal


def test_the_scan_is_linear_on_runs_of_braces():
    """The regex \\{\\{(.*?)\\}\\} retries each `{{` of an unclosed run: quadratic."""
    t = time.perf_counter()
    assert list(spans("{{" * 200_000)) == []
    assert len(list(spans("{{" * 200_000 + "}}"))) == 1
    assert len(list(spans("{{a}}" * 200_000))) == 200_000
    assert time.perf_counter() - t < 2.0  # ~0.05 s; a quadratic scan takes minutes


def test_placeholder_ids_come_from_prompt_text_only():
    body = {"model": "m", "stop": ["{{s}}"], "user": "{{u}}", "messages": [
        {"role": "system", "content": "sys {{a}}", "name": "{{n}}"},
        {"role": "user", "content": [
            {"type": "text", "text": "{{b}} and {{c}}"},
            {"type": "image_url", "image_url": {"url": "http://x/{{img}}"}},
            {"type": "input_text", "text": "{{other_type}}"},
            {"type": "text", "text": 5},
            {"type": "text", "text": "{{b}}"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "{{t}}"}}]},
        "not a message"]}
    assert list(placeholder_ids(body, CHAT)) == ["a", "b", "c", "b"]
    assert list(placeholder_ids({"messages": "{{a}}"}, CHAT)) == []
    assert list(placeholder_ids(["{{a}}"], CHAT)) == []


def test_placeholder_ids_of_completions_and_embeddings():
    assert list(placeholder_ids({"prompt": "x {{a}} {{b}}"}, COMPLETIONS)) == ["a", "b"]
    prompts = {"prompt": ["{{a}}", [1, 2], 3, "{{b}}"]}
    assert list(placeholder_ids(prompts, COMPLETIONS)) == ["a", "b"]
    assert list(placeholder_ids({"prompt": [[1, 2]], "suffix": "{{a}}"}, COMPLETIONS)) == []
    assert list(placeholder_ids({"input": "{{a}}"}, EMBEDDINGS)) == []
    assert list(placeholder_ids({"messages": [{"content": "{{a}}"}]}, COMPLETIONS)) == []


SPECIAL = ('ü 😀 "quoted" \'single\' back\\slash \\n not-a-newline\nreal newline\t\x00 \u2028 '
           '</s> {"j": [1]} \\u0041 }} {{')


def test_substitution_is_exact_for_any_text():
    body = _chat("Q: 2+2?\nA: {{ans}}\nGrade:")
    out = substitute(body, CHAT, {"ans": SPECIAL})
    assert _text(out) == "Q: 2+2?\nA: " + SPECIAL + "\nGrade:"
    # JSON-encoded for the engine and decoded, the text is unchanged
    assert _text(orjson.loads(orjson.dumps(out))) == "Q: 2+2?\nA: " + SPECIAL + "\nGrade:"


def test_several_placeholders_the_same_one_twice_and_unknown_ones():
    body = _chat("{{a}}{{a}} | {{b}} | {{c}} | {{a}")
    out = substitute(body, CHAT, {"a": "1", "b": ""})
    assert _text(out) == "11 |  | {{c}} | {{a}"


def test_an_inserted_text_is_never_substituted_again():
    out = substitute(_chat("x {{a}} y {{b}}"), CHAT, {"a": "{{b}} and {{a}}", "b": "B"})
    assert _text(out) == "x {{b}} and {{a}} y B"


def test_output_that_completes_a_placeholder_around_it_is_not_read_as_one():
    out = substitute(_chat("{{{{a}}}}"), CHAT, {"{{a": "X", "a": "Y"})
    assert _text(out) == "X}}"  # the first `{{` opens, the first `}}` closes: id "{{a"


def test_parts_lists_and_other_messages():
    body = {"model": "m", "messages": [
        {"role": "system", "content": "judge of {{a}}"},
        {"role": "user", "content": [{"type": "text", "text": "answer: {{a}}"},
                                     {"type": "image_url", "image_url": {"url": "{{a}}"}}]},
        {"role": "assistant", "content": None}]}
    out = substitute(body, CHAT, {"a": "42"})
    assert out["messages"][0]["content"] == "judge of 42"
    assert out["messages"][1]["content"] == [{"type": "text", "text": "answer: 42"},
                                             {"type": "image_url", "image_url": {"url": "{{a}}"}}]
    assert out["messages"][2] == {"role": "assistant", "content": None}


def test_completions_prompt_string_and_list():
    assert substitute({"prompt": "p {{a}}", "suffix": "{{a}}"}, COMPLETIONS, {"a": "1"}) == \
        {"prompt": "p 1", "suffix": "{{a}}"}
    out = substitute({"prompt": ["{{a}}", "{{b}}", [7, 8]]}, COMPLETIONS, {"a": "1", "b": "2"})
    assert out == {"prompt": ["1", "2", [7, 8]]}


def test_the_body_is_not_changed_and_the_result_is_a_new_body():
    body = {"model": "m", "temperature": 0, "messages": [
        {"role": "user", "content": "{{a}}"},
        {"role": "user", "content": [{"type": "text", "text": "{{a}}"}]}]}
    before = copy.deepcopy(body)
    out = substitute(body, CHAT, {"a": "X"})
    assert body == before
    assert out is not body and out["messages"] is not body["messages"]
    assert all(o is not b for o, b in zip(out["messages"], body["messages"]))
    assert out["messages"][1]["content"] is not body["messages"][1]["content"]
    out["messages"][1]["content"][0]["text"] = "changed"
    assert body == before
    prompt = {"prompt": ["{{a}}"]}
    assert substitute(prompt, COMPLETIONS, {"a": "X"})["prompt"] is not prompt["prompt"]
    assert prompt == {"prompt": ["{{a}}"]}


def test_malformed_shapes_are_copied_untouched():
    for body in ({"messages": "{{a}}"}, {"messages": [5, None, {"content": 7}]},
                 {"messages": [{"content": [{"type": "text", "text": 5}, "x"]}]}):
        assert substitute(body, CHAT, {"a": "X"}) == body
    assert substitute({"input": "{{a}}"}, EMBEDDINGS, {"a": "X"}) == {"input": "{{a}}"}


def test_template_takes_out_only_the_given_placeholders():
    body = _chat("A {{a}} B {{b}} C {{not-an-id}}")
    assert _text(template(body, CHAT, ("a", "b"))) == "A  B  C {{not-an-id}}"
    assert _text(template(body, CHAT, ("a",))) == "A  B {{b}} C {{not-an-id}}"
    assert body == _chat("A {{a}} B {{b}} C {{not-an-id}}")


@pytest.mark.parametrize("response,url,text", [
    ({"choices": [{"message": {"role": "assistant", "content": "4"}}]}, CHAT, "4"),
    ({"choices": [{"message": {"content": ""}}, {"message": {"content": "2nd"}}]}, CHAT, ""),
    ({"choices": [{"text": " four"}]}, COMPLETIONS, " four"),
    ({"choices": [{"message": {"content": None, "tool_calls": []}}]}, CHAT, None),
    ({"choices": [{"message": {"content": ["parts"]}}]}, CHAT, None),
    ({"choices": [{"text": "4"}]}, CHAT, None),
    ({"choices": [{"message": {"content": "4"}}]}, COMPLETIONS, None),
    ({"choices": []}, CHAT, None),
    ({"choices": {"0": {"text": "4"}}}, COMPLETIONS, None),
    ({"choices": ["4"]}, COMPLETIONS, None),
    ({"data": [{"embedding": [0.1]}]}, EMBEDDINGS, None),
    ({"choices": [{"text": "4"}]}, EMBEDDINGS, None),
    (None, CHAT, None),
    ("text", COMPLETIONS, None),
])
def test_generated_text(response, url, text):
    assert generated_text(response, url) == text
