"""Placeholders: how one request of a batch takes in another's generated text.

A line with `"depends_on": [custom_id, ...]` may write `{{custom_id}}` in its prompt text (chat:
each message's `content` string or the `text` of its text parts; completions: `prompt`, a string or
a list of strings; nothing else of the body). Before the request is sent, each placeholder of a
listed id is replaced by that request's generated text (`generated_text`).

The syntax, read left to right: a placeholder starts at a `{{` and ends at the first `}}` after it;
the text between is its id, whatever it holds (braces, regex characters, quotes, newlines, any
Unicode). So an id that ends with `}` or holds `}}` cannot be written as a placeholder (`nameable`;
it can still be depended on, for order only), and a `{` right before a placeholder is read as part
of its id. A placeholder of an id not substituted stays as it is, literal text. The scan is linear
in the text whatever it holds (the regex `\\{\\{(.*?)\\}\\}` retries every later `{{` when one
has no `}}` after it: quadratic over a long run of them).

Pure (no I/O): the gateway's validation measures the template with it, the executor fills it in.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

OPEN, CLOSE = "{{", "}}"
# the endpoints whose prompts hold text; the runtime has no other use of the URL strings, and the
# gateway's own constants sit above it
_CHAT, _COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def placeholder(custom_id: str) -> str:
    """The text that stands for `custom_id`'s generated text in a prompt."""
    return OPEN + custom_id + CLOSE


def nameable(custom_id: str) -> bool:
    """Whether `placeholder(custom_id)` reads back as that id: its first `}}` is its end."""
    return CLOSE not in custom_id + "}"


def spans(text: str) -> Iterator[tuple[int, int, str]]:
    """(start, end, id) of each placeholder in `text`, left to right, never overlapping:
    `text[start:end] == placeholder(id)`."""
    find = text.find
    start = find(OPEN)
    while start >= 0:
        close = find(CLOSE, start + 2)
        if close < 0:  # nor has any later `{{` a `}}` after it
            return
        yield start, close + 2, text[start + 2:close]
        start = find(OPEN, close + 2)


def prompt_texts(body: Any, url: str) -> Iterator[str]:
    """Every text of `body` that placeholders may stand in, in order. Other shapes (token ids, image
    parts, a body that is not an object) hold none; validation rejects the malformed ones."""
    if not isinstance(body, dict):
        return
    if url == _CHAT:
        msgs = body.get("messages")
        for msg in msgs if isinstance(msgs, list) else ():
            content = msg.get("content") if isinstance(msg, dict) else None
            if isinstance(content, str):
                yield content
            elif isinstance(content, list):
                for part in content:
                    if _is_text_part(part):
                        yield part["text"]
    elif url == _COMPLETIONS:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            yield prompt
        elif isinstance(prompt, list):
            yield from (p for p in prompt if isinstance(p, str))


def placeholder_ids(body: Any, url: str) -> Iterator[str]:
    """The id of every placeholder in `body`'s prompt text, in order, repeats included (ids of no
    request too: those stay literal text)."""
    for text in prompt_texts(body, url):
        for _, _, cid in spans(text):
            yield cid


def substitute(body: dict[str, Any], url: str, outputs: Mapping[str, str]) -> dict[str, Any]:
    """A new body in which each placeholder of an id in `outputs` is replaced by its text, exactly
    (no escaping: the body is JSON-encoded when sent). One pass: a placeholder inside an inserted
    text is never filled in. `body` is not changed: the returned body has its own messages list,
    message objects, text parts and prompt list, and shares every other value with `body`."""
    new = dict(body)
    if url == _CHAT:
        msgs = body.get("messages")
        if isinstance(msgs, list):
            new["messages"] = [_fill_message(m, outputs) for m in msgs]
    elif url == _COMPLETIONS:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            new["prompt"] = _fill(prompt, outputs)
        elif isinstance(prompt, list):
            new["prompt"] = [_fill(p, outputs) if isinstance(p, str) else p for p in prompt]
    return new


def template(body: dict[str, Any], url: str, ids: Iterable[str]) -> dict[str, Any]:
    """`body` with the placeholders of `ids` taken out: the request's own text, the part of its
    prompt known before its dependencies have run (validation measures this)."""
    return substitute(body, url, dict.fromkeys(ids, ""))


def generated_text(response_body: Any, url: str) -> str | None:
    """The text a finished request generated (chat: `choices[0].message.content`, completions:
    `choices[0].text`); None when the response has none (another shape, a tool call, embeddings)."""
    choices = response_body.get("choices") if isinstance(response_body, dict) else None
    first = choices[0] if isinstance(choices, list) and choices else None
    if not isinstance(first, dict):
        return None
    if url == _CHAT:
        msg = first.get("message")
        text = msg.get("content") if isinstance(msg, dict) else None
    elif url == _COMPLETIONS:
        text = first.get("text")
    else:
        return None
    return text if isinstance(text, str) else None


def _is_text_part(part: Any) -> bool:
    return (isinstance(part, dict) and part.get("type") == "text"
            and isinstance(part.get("text"), str))


def _fill_message(msg: Any, outputs: Mapping[str, str]) -> Any:
    if not isinstance(msg, dict):
        return msg
    new = dict(msg)
    content = msg.get("content")
    if isinstance(content, str):
        new["content"] = _fill(content, outputs)
    elif isinstance(content, list):
        new["content"] = [dict(p, text=_fill(p["text"], outputs)) if _is_text_part(p) else p
                          for p in content]
    return new


def _fill(text: str, outputs: Mapping[str, str]) -> str:
    pieces: list[str] = []
    done = 0  # text[:done] is in pieces
    for start, end, cid in spans(text):
        out = outputs.get(cid)
        if out is not None:
            pieces += (text[done:start], out)
            done = end
    if not pieces:
        return text
    pieces.append(text[done:])
    return "".join(pieces)
