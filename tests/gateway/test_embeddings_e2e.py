"""Embeddings end to end on a real vLLM engine: the OpenAI SDK -> the gateway -> the real
`PoolExecutor` -> a pooling engine of the shared tiny-a weights, converted as the demo config's
`tiny-embed` is (`--runner pooling --convert embed`; ~30 s to start here)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cli.serve import default_executor
from runtime.config import ModelConfig

from .conftest import jsonl, poll, read_lines, running

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.engine,
              pytest.mark.timeout(600)]
EMBEDDINGS = "/v1/embeddings"


def _line(cid: str, text: str | list[str]) -> dict:
    return {"custom_id": cid, "method": "POST", "url": EMBEDDINGS,
            "body": {"model": "tiny-embed", "input": text, "encoding_format": "float"}}


async def test_an_embeddings_batch_returns_a_vector_per_input(test_config, tiny_model_dir,
                                                              tmp_path_factory):
    weights = tiny_model_dir / "tiny-a"
    hidden = json.loads((weights / "config.json").read_text())["hidden_size"]
    embed = ModelConfig(name="tiny-embed", path=str(weights), max_model_len=1024,
                        max_num_seqs=32, max_num_batched_tokens=1024,
                        engine_args={"enforce_eager": True, "runner": "pooling",
                                     "convert": "embed"})
    cfg = dataclasses.replace(
        test_config, models=[*test_config.models, embed],
        server=dataclasses.replace(test_config.server,
                                   state_dir=str(tmp_path_factory.mktemp("embed"))),
        devices=dataclasses.replace(test_config.devices, spare_engines=0))  # one start: no spares
    lines = [_line(f"e{i}", f"the number {i} is a word") for i in range(6)]
    lines.append(_line("pair", ["first of two", "second of two"]))
    async with running(cfg, default_executor(cfg)) as srv:
        client = srv.client()
        served = {m.id: m.model_extra["endpoints"] async for m in client.models.list()}
        assert served["tiny-embed"] == [EMBEDDINGS] and EMBEDDINGS not in served["tiny-a"]
        f = await client.files.create(file=("emb.jsonl", jsonl(lines)), purpose="batch")
        b = await client.batches.create(input_file_id=f.id, endpoint=EMBEDDINGS,
                                        completion_window="24h")
        done = await poll(client, b.id, timeout_s=500)
        assert done.status == "completed", done
        assert done.request_counts.completed == len(lines) and done.error_file_id is None, done
        out = await read_lines(client, done.output_file_id)
    assert [o["custom_id"] for o in out] == [ln["custom_id"] for ln in lines]  # input order
    for o in out:
        body = o["response"]["body"]
        assert o["response"]["status_code"] == 200 and body["model"] == "tiny-embed"
        n = 2 if o["custom_id"] == "pair" else 1
        assert [d["index"] for d in body["data"]] == list(range(n))
        for d in body["data"]:
            vec = d["embedding"]
            assert len(vec) == hidden and all(isinstance(x, float) for x in vec)
            assert abs(sum(x * x for x in vec) - 1.0) < 1e-3  # vLLM normalizes embed pooling
        assert body["usage"]["prompt_tokens"] > 0
    assert done.usage.input_tokens == sum(o["response"]["body"]["usage"]["prompt_tokens"]
                                          for o in out)
    assert done.usage.output_tokens == 0
