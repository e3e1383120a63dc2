"""Shared prompt prefixes of a batch, as chains of KV-block hashes the planner can price.

vLLM caches a prompt's KV blocks (16 tokens each) under a hash chain: block k's hash covers blocks
0..k, so two prompts share exactly their leading blocks of equal hashes. The simulator
(`scheduler.simulator`, `SimRequest.prefix`) replays that cache; it needs, per request, the hashes of
the leading blocks it may share with another request, nothing else.

Validation does not run the tokenizer on every line (BPE costs about 1 ms per KB here; the
characters-per-token estimate is what it uses, `gateway.tokens`). So a block is measured in
characters: BLOCK_SIZE × the model's characters per token, and block k's hash chains the text of
blocks 0..k with the model's name (two models never share a cache). Text equal up to some point is
equal in tokens up to a token or two before it, so the leading full blocks of a shared text are
counted within about one block of the engine's own.

Cost: a line whose first block no other line has shares nothing, and hashing its whole chain
(~0.3 us a block) would double validation's CPU time on a file of unrelated prompts; so only its
first block is hashed (`PrefixIndex`), and its full chain when a second line starts like it (the
first such line is read back from the file once).

Memory: a line's chain is kept only while the file is validated (an `array` of 8-byte hashes, at
most MAX_BLOCKS); each item then keeps only the part it shares with some other line, and equal
parts are one interned tuple (a system prompt over 50,000 lines is one tuple).
"""

from __future__ import annotations

from array import array
from typing import Any, Callable, Sequence

from runtime.endpoints import CHAT, COMPLETIONS, RESPONSES
from runtime.placeholders import spans
from scheduler.types import BLOCK_SIZE

MAX_BLOCKS = 512  # 8,192 tokens: longer shared prefixes are counted up to here
_SEP = "\x00"  # between messages: the chat template puts role markers there


def prompt_text(body: dict[str, Any], endpoint: str, deps: Sequence[str] = ()) -> str | None:
    """The prompt as one text, in order, up to the first placeholder of a listed upstream id (what
    follows it is that request's generated text, never shared). None: no text prefix to hash
    (token-id prompts, several prompts in one request, embeddings)."""
    if endpoint == CHAT:
        parts: list[str] = []
        for msg in body.get("messages") or ():
            if not isinstance(msg, dict):
                return None
            role = msg.get("role")
            parts.append(role if isinstance(role, str) else "")
            content = msg.get("content")
            if isinstance(content, str):
                texts: Sequence[str] = (content,)
            elif isinstance(content, list):
                texts = [t for p in content if isinstance(p, dict)
                         and isinstance(t := p.get("text"), str)]
            else:
                texts = ()
            for text in texts:
                cut = _first_placeholder(text, deps)
                if cut is not None:
                    parts.append(text[:cut])
                    return _SEP.join(parts)
                parts.append(text)
        return _SEP.join(parts)
    if endpoint == RESPONSES:  # one string input; items are not hashed (no placeholders here)
        prompt, instructions = body.get("input"), body.get("instructions")
        if not isinstance(prompt, str):
            return None
        return prompt if not isinstance(instructions, str) else instructions + _SEP + prompt
    if endpoint == COMPLETIONS:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return None
        cut = _first_placeholder(prompt, deps)
        return prompt if cut is None else prompt[:cut]
    return None


def _first_placeholder(text: str, deps: Sequence[str]) -> int | None:
    if not deps or "{{" not in text:
        return None
    for start, _end, cid in spans(text):
        if cid in deps:
            return start
    return None


def chain(model: str, text: str, chars_per_token: float) -> array:
    """Hashes of the text's leading full blocks (at most MAX_BLOCKS), each over all text before its
    end. Python's `hash` of a (previous hash, chunk) tuple: C speed, 64 bits, consistent within the
    process, which is all a plan needs (chains are derived again when a batch is resumed)."""
    stride = _stride(chars_per_token)
    n = min(len(text) // stride, MAX_BLOCKS)
    out = array("q")
    h = hash(model)
    for k in range(n):
        h = hash((h, text[k * stride:(k + 1) * stride]))
        out.append(h)
    return out


def _stride(chars_per_token: float) -> int:
    return max(1, round(BLOCK_SIZE * chars_per_token))


class PrefixIndex:
    """The chains of one file's lines, built as the lines are validated (see the module's Cost).
    `reread(owner)` gives an added line's text again (from the file): called once per group, for
    its first line. Per line of a file of unrelated prompts it keeps one int and one reference
    (a tuple or closure per line measured 4 us a line here, most of it the garbage collector's)."""

    def __init__(self, reread: Callable[[Any], str | None]) -> None:
        self._reread = reread
        self._owners: list[Any] = []  # the lines added, by index
        self._chains: dict[int, array] = {}  # index -> full chain, for lines in a group of >= 2
        # first-block hash -> index of the one line that has it, -1 once a second line had it
        self._first: dict[int, int] = {}

    def add(self, owner: Any, model: str, text: str, chars_per_token: float) -> None:
        stride = _stride(chars_per_token)
        if len(text) < stride:
            return  # not one full block: nothing to share
        h1 = hash((hash(model), text[:stride]))
        first = self._first
        j = first.get(h1)
        i = len(self._owners)
        self._owners.append(owner)
        if j is None:
            first[h1] = i
            return
        if j >= 0:  # the first line that starts so: its full chain now
            try:
                again = self._reread(self._owners[j])
            except (OSError, ValueError):  # its line is gone: it shares nothing
                again = None
            if again:
                self._chains[j] = chain(model, again, chars_per_token)
            first[h1] = -1
        self._chains[i] = chain(model, text, chars_per_token)

    def shared(self) -> list[tuple[Any, tuple[int, ...]]]:
        """(owner, its shared prefix) for every line with one."""
        idx = list(self._chains)
        got = shared_prefixes([self._chains[i] for i in idx])
        return [(self._owners[i], p) for i, p in zip(idx, got) if p]


def shared_prefixes(chains: Sequence[array]) -> list[tuple[int, ...]]:
    """For each chain, its leading hashes that some other chain also starts with (the longest
    common prefix with any other line), as interned tuples; () when it shares nothing. Sorting puts
    the chain with the longest common prefix next to each one, so only neighbours are compared."""
    n = len(chains)
    shared = [0] * n
    order = sorted(range(n), key=chains.__getitem__)
    for a, b in zip(order, order[1:]):
        k = _common(chains[a], chains[b])
        if k > shared[a]:
            shared[a] = k
        if k > shared[b]:
            shared[b] = k
    interned: dict[tuple[int, int], tuple[int, ...]] = {}
    out: list[tuple[int, ...]] = []
    for c, k in zip(chains, shared):
        if k == 0:
            out.append(())
            continue
        key = (k, c[k - 1])  # a chain's hash names everything before it
        t = interned.get(key)
        if t is None:
            t = interned[key] = tuple(c[:k])
        out.append(t)
    return out


def _common(a: array, b: array) -> int:
    """Length of the common prefix of two chains (binary search: slices compare in C)."""
    lo, hi = 0, min(len(a), len(b))
    if hi and a[hi - 1] == b[hi - 1]:
        return hi  # equal hashes at k mean equal blocks 0..k
    while lo < hi:  # invariant: a[:lo] == b[:lo]; a[hi] != b[hi] or hi is the end
        mid = (lo + hi + 1) // 2
        if a[mid - 1] == b[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo
