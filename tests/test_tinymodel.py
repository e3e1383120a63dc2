"""`samullm tiny-model`: deterministic offline model + tokenizer with a chat template."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cli.main import main as cli_main
from tools.tinymodel import BOS, EOS, write_tiny_model


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path):
    a = write_tiny_model(tmp_path / "a", seed=3)
    assert cli_main([*"tiny-model".split(), str(tmp_path / "b"), "--seed", "3"]) == 0
    c = write_tiny_model(tmp_path / "c", seed=4)
    da, db, dc = _digests(a), _digests(tmp_path / "b"), _digests(c)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(da)
    assert da == db
    assert da["model.safetensors"] != dc["model.safetensors"]
    assert da["tokenizer.json"] == dc["tokenizer.json"]  # one tokenizer for every tiny model


def test_config_matches_arguments(tmp_path: Path):
    d = write_tiny_model(tmp_path / "m", layers=3, hidden=256, heads=4, kv_heads=2, vocab=1024)
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"]) == (3, 256, 4, 2, 1024)
    assert cfg["intermediate_size"] == 1024


def test_tokenizer_and_chat_template(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "tiny-a")
    assert len(tok) == 2048
    assert (tok.bos_token, tok.eos_token) == (BOS, EOS)
    text = tok.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}],
        tokenize=False, add_generation_prompt=True)
    assert text == "<s><|system|>\nbe brief</s>\n<|user|>\nhello there</s>\n<|assistant|>\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.convert_tokens_to_ids("<|user|>") in ids
    assert tok.decode(tok("any text 123, ok?", add_special_tokens=False)["input_ids"]) == \
        "any text 123, ok?"
