"""`samullm serve` plumbing that needs no running server: overrides, the bind check, demo models."""

from __future__ import annotations

import argparse

from cli.main import main
from cli.serve import apply_overrides, make_demo_models
from runtime.config import parse_config


def _write_config(tmp_path, host="127.0.0.1"):
    path = tmp_path / "c.toml"
    path.write_text(f'[server]\nhost = "{host}"\nstate_dir = "{tmp_path / "state"}"\n'
                    '[[models]]\nname = "m"\narch = {num_layers = 1, hidden_size = 64, '
                    'num_heads = 2, num_kv_heads = 1, intermediate_size = 128, vocab_size = 100}\n')
    return path


def test_serve_refuses_network_bind_without_keys(tmp_path, capsys):
    assert main(["serve", "--config", str(_write_config(tmp_path)), "--host", "0.0.0.0"]) == 2
    assert "api_keys" in capsys.readouterr().err
    assert main(["serve", "--config", str(_write_config(tmp_path, host="10.1.2.3"))]) == 2


def test_overrides(tmp_path):
    cfg = parse_config({"models": []})
    args = argparse.Namespace(host="::1", port=9999, state_dir=str(tmp_path))
    out = apply_overrides(cfg, args)
    assert (out.server.host, out.server.port, out.state_dir) == ("::1", 9999, tmp_path)
    same = apply_overrides(cfg, argparse.Namespace(host=None, port=None, state_dir=None))
    assert same.server == cfg.server


def test_make_demo_models_writes_only_missing(tmp_path):
    cfg = parse_config({"models": [
        {"name": "d", "path": "models/d", "demo": {"layers": 1, "hidden": 64, "heads": 2,
                                                    "kv_heads": 1, "seed": 3}},
        {"name": "plan", "arch": {"num_layers": 1, "hidden_size": 64, "num_heads": 2,
                                  "num_kv_heads": 1, "intermediate_size": 128,
                                  "vocab_size": 100}},
    ]}, base_dir=tmp_path)
    written = make_demo_models(cfg)
    assert written == [tmp_path / "models/d"]
    assert (tmp_path / "models/d/config.json").exists()
    assert (tmp_path / "models/d/tokenizer.json").exists()
    assert make_demo_models(cfg) == []
    # the prompt-token estimate uses the model's own tokenizer once it has one
    from tokenizers import Tokenizer

    from gateway.tokens import TokenCounter

    tok = Tokenizer.from_file(str(tmp_path / "models/d/tokenizer.json"))
    text = "the quick brown fox jumps over the lazy dog " * 5
    counter = TokenCounter(cfg)
    assert counter.count_text("d", text) == len(tok.encode(text, add_special_tokens=False).ids)
    assert counter.count_text("plan", text) == (len(text) + 3) // 4
    body = {"messages": [{"role": "user", "content": text}]}
    assert counter.count_body("d", "/v1/chat/completions", body) == counter.count_text("d", text) + 4
    assert counter.count_body("d", "/v1/completions", {"prompt": [1, 2, 3]}) == 3
