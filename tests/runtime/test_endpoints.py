"""Which endpoints a model serves: from its engine_args (vLLM's --runner / --convert) or declared
in `endpoints`; contradictions are config errors naming the key; the demo config serves one
embedding model out of the box."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.config import ConfigError, ModelConfig, load_config, parse_config
from runtime.endpoints import CHAT, COMPLETIONS, EMBEDDINGS, GENERATING, RESPONSES

REPO = Path(__file__).resolve().parents[2]


def served(**kw) -> tuple[str, ...]:
    return ModelConfig(name="m", path="x", **kw).served_endpoints


def test_a_model_generates_unless_its_engine_args_pool():
    assert served() == GENERATING == (CHAT, COMPLETIONS, RESPONSES)
    assert served(engine_args={"enforce_eager": True, "runner": "generate"}) == GENERATING
    assert served(engine_args={"runner": "pooling"}) == (EMBEDDINGS,)
    assert served(engine_args={"runner": "pooling", "convert": "embed"}) == (EMBEDDINGS,)
    # vLLM resolves --runner auto to pooling when a conversion is asked for
    assert served(engine_args={"convert": "embed"}) == (EMBEDDINGS,)
    assert served(engine_args={"runner": "auto", "convert": "none"}) == GENERATING


def test_declared_endpoints_win_for_models_vllm_pools_by_architecture():
    # a BERT-like or sentence-transformers directory: vLLM pools it under --runner auto
    assert served(endpoints=[EMBEDDINGS]) == (EMBEDDINGS,)
    assert served(endpoints=[CHAT]) == (CHAT,)  # a generating model limited to chat


@pytest.mark.parametrize("model,match", [
    ({"endpoints": ["/v1/bogus"]}, r"models\[0\]\.endpoints: .*/v1/bogus"),
    ({"endpoints": [CHAT, EMBEDDINGS]}, r"models\[0\]\.endpoints: .*either generates .* or pools"),
    ({"endpoints": [CHAT], "engine_args": {"runner": "pooling"}},
     r"models\[0\]\.endpoints: .*runner = \"pooling\""),
    ({"endpoints": [EMBEDDINGS], "engine_args": {"runner": "generate"}},
     r"models\[0\]\.endpoints: .*runner = \"generate\""),
    ({"engine_args": {"runner": "pooling", "convert": "classify"}},
     r"models\[0\]\.engine_args: .*classify.* none of the batch endpoints"),
    ({"engine_args": {"runner": "draft"}}, r"models\[0\]\.engine_args\.runner"),
])
def test_contradictions_are_config_errors(model, match):
    with pytest.raises(ConfigError, match=match):
        parse_config({"models": [{"name": "m", "path": "x", **model}]})


def test_demo_config_serves_an_embedding_model():
    cfg = load_config(REPO / "conf" / "default.toml")
    kinds = {m.name: m.served_endpoints for m in cfg.models}
    embedders = [m for m in cfg.models if m.served_endpoints == (EMBEDDINGS,)]
    assert len(embedders) == 1, kinds
    m = embedders[0]
    assert m.engine_args.get("runner") == "pooling" and m.engine_args.get("convert") == "embed"
    assert m.demo is not None and m.demo.hidden // m.demo.heads >= 32 and m.dtype == "float32"
    assert sum(v == GENERATING for v in kinds.values()) >= 3
