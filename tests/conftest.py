"""Shared fixtures: offline test models (built once, reused across runs) and a test Config.

`tiny_model_dir` builds the models under `.samullm/test-models/` at the repo root behind a file lock
(engineers and CI runs may share the checkout) and into a temporary directory renamed into place, so a
half-written model is never seen. A model directory is reused when its build arguments match.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path

import pytest

from runtime.config import Config, DevicesConfig, ModelConfig, ServerConfig

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / ".samullm" / "test-models"

# name -> write_tiny_model arguments
TEST_MODELS: dict[str, dict] = {
    "tiny-a": dict(layers=2, hidden=128, heads=2, kv_heads=1, seed=0),
    "tiny-b": dict(layers=2, hidden=128, heads=2, kv_heads=1, seed=1),
    "small": dict(layers=4, hidden=256, heads=4, kv_heads=2, seed=2),
}


def ensure_test_model(name: str, args: dict, root: Path = MODELS_DIR) -> Path:
    """Build `root/name` with `write_tiny_model(**args)` unless an identical build is already there."""
    from tools.tinymodel import write_tiny_model

    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    stamp = json.dumps(args, sort_keys=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "build-args.json").exists() and (target / "build-args.json").read_text() == stamp:
            return target
        tmp = root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        write_tiny_model(tmp, **args)
        (tmp / "build-args.json").write_text(stamp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """Directory holding the test models `tiny-a`, `tiny-b` (hidden 128, 2 layers) and `small`
    (hidden 256, 4 layers), each an HF directory loadable by vLLM with dtype float32."""
    for name, args in TEST_MODELS.items():
        ensure_test_model(name, args)
    return MODELS_DIR


@pytest.fixture(scope="session")
def test_config(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Config:
    """Models tiny-a / tiny-b / small, max_model_len 1024, max_num_seqs 32, CPU cores [0, 1], KV
    0.25 GiB per engine. Engines run eagerly: torch.compile would add ~50 s to each first start."""
    models = [
        ModelConfig(name=name, path=str(tiny_model_dir / name), max_model_len=1024,
                    max_num_seqs=32, max_num_batched_tokens=1024,
                    engine_args={"enforce_eager": True})
        for name in TEST_MODELS
    ]
    cfg = Config(
        server=ServerConfig(state_dir=str(tmp_path_factory.mktemp("state"))),
        models=models,
        devices=DevicesConfig(kind="cpu", ids=[0, 1], cpu_kvcache_gib=0.25),
        base_dir=REPO,
    )
    cfg.validate()
    return cfg
