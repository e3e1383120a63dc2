"""The OpenAI endpoints a batch line may address, and which of them a model serves.

A vLLM engine either generates (chat, completions, responses) or pools (embeddings), never both:
its `--runner` is `generate` or `pooling` (vLLM `config/model.py`). `--runner auto` is resolved
from the model's architecture, and to `pooling` whenever a `--convert` (`embed`, `classify`) is
asked for. A model entry says which it is in one place: `endpoints` when declared (the way to say
it of a model vLLM pools by its architecture alone, a BERT-like or sentence-transformers
directory), else its engine_args (`runner = "pooling"`, or `convert = "embed"`, pools); a model
without either generates. Validation refuses a line for an endpoint its model does not serve, and
`GET /v1/models` lists them.
"""

from __future__ import annotations

from typing import Any, Sequence

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
EMBEDDINGS, RESPONSES = "/v1/embeddings", "/v1/responses"
GENERATING = (CHAT, COMPLETIONS, RESPONSES)  # what a --runner generate engine serves
POOLING = (EMBEDDINGS,)  # what a --runner pooling --convert embed engine serves
ALL = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES)

_RUNNERS = ("auto", "generate", "pooling")  # vLLM's "draft" runs speculative heads: no server
_CONVERTS = ("auto", "none", "embed", "classify")


def pools(engine_args: dict[str, Any]) -> bool | None:
    """Whether engine_args make vLLM pool (True), generate (False), or leave it to the model's
    architecture (None: `--runner auto` without a conversion)."""
    runner, convert = engine_args.get("runner", "auto"), engine_args.get("convert", "auto")
    if runner != "auto":
        return runner == "pooling"
    return None if convert in ("auto", "none") else True


def served_endpoints(engine_args: dict[str, Any], declared: Sequence[str]) -> tuple[str, ...]:
    """The endpoints of `ALL` a model serves, in `ALL`'s order: `declared` when not empty, else
    from engine_args (pooling with an `embed` conversion, or none asked: embeddings; a
    `classify` one: none of them; not pooling: the generating ones)."""
    if declared:
        return tuple(e for e in ALL if e in declared)
    if not pools(engine_args):
        return GENERATING
    return () if engine_args.get("convert") == "classify" else POOLING


def endpoints_error(engine_args: dict[str, Any], declared: Sequence[str]) -> tuple[str, str] | None:
    """(key, message) when a model entry's `endpoints` and engine_args cannot both hold, else None;
    the key is `endpoints`, `engine_args` or `engine_args.runner` / `.convert`."""
    for key, value, allowed in (("runner", engine_args.get("runner", "auto"), _RUNNERS),
                                ("convert", engine_args.get("convert", "auto"), _CONVERTS)):
        if value not in allowed:
            return f"engine_args.{key}", f"one of {', '.join(allowed)} for a served model; " \
                                         f"got {value!r}"
    if unknown := [e for e in declared if e not in ALL]:
        return "endpoints", f"{unknown[0]} is not a batch endpoint (one of {', '.join(ALL)})"
    kinds = {e in POOLING for e in declared}
    if len(kinds) > 1:
        return "endpoints", ("a vLLM engine either generates (" + ", ".join(GENERATING) +
                             ") or pools (" + ", ".join(POOLING) + "), never both")
    pooled = pools(engine_args)
    if declared and pooled is not None and kinds != {pooled}:
        said = " and ".join(f"{k} = \"{engine_args[k]}\"" for k in ("runner", "convert")
                            if k in engine_args)
        return "endpoints", f"{', '.join(declared)} is not served by an engine with engine_args " \
                            f"{said}"
    if not served_endpoints(engine_args, declared):
        return "engine_args", "convert = \"classify\" makes a classifier, which serves none of " \
                              f"the batch endpoints ({', '.join(ALL)})"
    return None


def mismatch_message(model: str, endpoint: str, served: Sequence[str]) -> str:
    """Why a line for `endpoint` cannot go to `model`, which serves `served`."""
    if not served:
        return f"Model {model!r} serves none of the batch endpoints."
    kind = "an embedding model" if set(served) <= set(POOLING) else "a generating model"
    return f"Model {model!r} is {kind}: it serves {', '.join(served)}, not {endpoint}."
