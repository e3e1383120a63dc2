"""What the executor's tests share: a config of fake models (a, b, c and one that fits nowhere),
work items, a sink that records outcomes, a one-batch run, and the events' kinds.

The fixtures that start executors on the test-double launcher are in `conftest.py` beside this."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

from runtime.config import Config, parse_config
from runtime.executor.executor import PoolExecutor
from runtime.executor_api import Outcome, WorkItem
from scheduler.types import DevicePool

from .fakes import FakeLauncher

ARCHS = {
    "a": {"num_layers": 2, "hidden_size": 128, "num_heads": 2, "num_kv_heads": 1},
    "b": {"num_layers": 4, "hidden_size": 256, "num_heads": 4, "num_kv_heads": 2},
    "c": {"num_layers": 8, "hidden_size": 512, "num_heads": 8, "num_kv_heads": 2},
}
CHAT = "/v1/chat/completions"


def make_cfg(tmp_path: Path, *, max_num_seqs: int = 4, max_retries: int = 2,
             strategy: str = "samullm") -> Config:
    models = [{"name": name, "path": f"/nonexistent/{name}", "max_model_len": 1024,
               "max_num_seqs": max_num_seqs, "max_num_batched_tokens": 1024,
               "arch": {**arch, "intermediate_size": 4 * arch["hidden_size"], "vocab_size": 2048}}
              for name, arch in ARCHS.items()]
    # one max-length sequence needs ~20 GiB of KV: fits no engine of 0.25 GiB
    models.append({"name": "huge", "path": "/nonexistent/huge", "max_model_len": 32768,
                   "arch": {"num_layers": 80, "hidden_size": 8192, "num_heads": 64,
                            "num_kv_heads": 8, "intermediate_size": 28672, "vocab_size": 32000}})
    return parse_config({"server": {"state_dir": str(tmp_path / "state")},
                         "devices": {"kind": "cpu", "cpu_kvcache_gib": 0.25},
                         "limits": {"max_retries": max_retries},
                         "scheduler": {"strategy": strategy}, "models": models})


def items(model: str, n: int, prefix: str = "", start: int = 1, **body: Any) -> list[WorkItem]:
    out = []
    for i in range(n):
        b = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16,
             "custom_tag": f"{prefix}{model}-{i}", **body}
        out.append(WorkItem(line=start + i, custom_id=f"{prefix}{model}-{i}", model=model, url=CHAT,
                            body=b, prompt_tokens=20, max_tokens=16))
    return out


class Sink:
    """Records outcomes in delivery order; slow on purpose (a journal fsyncs)."""

    def __init__(self, log: list[tuple[str, Outcome]] | None = None, batch: str = "") -> None:
        self.outcomes: list[Outcome] = []
        self.log = log if log is not None else []
        self.batch = batch

    async def __call__(self, outcome: Outcome) -> None:
        await asyncio.sleep(0.001)
        self.outcomes.append(outcome)
        self.log.append((self.batch, outcome))

    def by_id(self) -> dict[str, Outcome]:
        counts = Counter(o.custom_id for o in self.outcomes)
        assert max(counts.values(), default=1) == 1, f"duplicate outcomes: {counts.most_common(3)}"
        return {o.custom_id: o for o in self.outcomes}


async def run_once(cfg: Config, launcher: FakeLauncher, pool: DevicePool, work: list[WorkItem],
                   planner: Any = None, batch: str = "b") -> PoolExecutor:
    """Start an executor, run one batch of `work` to the end, close it; returns it (its events stay)."""
    ex = PoolExecutor(cfg, launcher, pool=pool, **({"planner": planner} if planner else {}))
    await ex.start()
    try:
        ex.submit(batch, work, Sink())
        await asyncio.wait_for(ex.wait(batch), 30)
    finally:
        await ex.close()
    return ex


def kinds(events: list[dict]) -> list[str]:
    return [e["event"] for e in events]
