"""The executor on real vLLM engines (tiny random-weight models on the CPU cores [0, 1]).

Few and slow on purpose (an engine start takes 20-30 s): a pooled multi-model job completes with a
re-plan when the first model finishes; a killed engine process does not lose the batch; a cancel
mid-run frees every engine, its process group included; a small batch's requests preempt a big
one's running ones, which the engine aborts and the executor re-runs."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from collections import Counter
from typing import Any, AsyncIterator

import pytest
import pytest_asyncio

from runtime.config import Config
from runtime.engines.engine import Engine, EngineSpec, VllmLauncher
from runtime.engines.procs import group_pids
from runtime.executor.executor import PoolExecutor
from runtime.executor_api import Outcome, WorkItem

pytestmark = [pytest.mark.engine, pytest.mark.timeout(600)]
CHAT = "/v1/chat/completions"


class RecordingLauncher:
    """The real launcher, remembering the engines it started (to kill one, to check they are gone)."""

    def __init__(self, inner: VllmLauncher) -> None:
        self.inner = inner
        self.spares = inner.spares
        self.freezable = inner.freezable
        self.engines: list[Engine] = []

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def launch(self, spec: EngineSpec) -> Engine:
        engine = await self.inner.launch(spec)
        self.engines.append(engine)
        return engine

    def in_spare(self, spec: EngineSpec) -> bool:
        return self.inner.in_spare(spec)

    def running(self, model: str | None = None) -> list[Engine]:
        return [e for e in self.engines
                if e.alive() and (model is None or e.spec.model.name == model)]


LINGER_S = 2.0  # warm engines between batches, kept short here


def chat(model: str, n: int, max_tokens: int, step: int = 0) -> list[WorkItem]:
    """`n` requests of exactly `max_tokens + i * step` output tokens (staggered: outcomes trickle
    in instead of arriving together)."""
    return [WorkItem(line=i + 1, custom_id=f"{model}-{i}", model=model, url=CHAT,
                     body={"model": model, "max_tokens": max_tokens + i * step, "temperature": 0,
                           "ignore_eos": True,  # random weights: fixed lengths, no early EOS
                           "messages": [{"role": "user", "content": f"count to {i}"}]},
                     prompt_tokens=12, max_tokens=max_tokens + i * step) for i in range(n)]


class Sink:
    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []

    async def __call__(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def once(self) -> dict[str, Outcome]:
        counts = Counter(o.custom_id for o in self.outcomes)
        assert max(counts.values(), default=1) == 1, counts.most_common(3)
        return {o.custom_id: o for o in self.outcomes}


@pytest_asyncio.fixture(loop_scope="function")
async def executor(test_config: Config, tmp_path) -> AsyncIterator[tuple[PoolExecutor, Any]]:
    launcher = RecordingLauncher(VllmLauncher(log_dir=tmp_path / "logs"))
    cfg = dataclasses.replace(test_config, devices=dataclasses.replace(
        test_config.devices, engine_linger_s=LINGER_S))
    ex = PoolExecutor(cfg, launcher, state_dir=tmp_path / "state")
    await ex.start()
    try:
        yield ex, launcher
    finally:
        await ex.close()
        for e in launcher.engines:  # no orphans: every process group is gone
            assert not e.alive() and group_pids(e.pid) == [], e


def kinds(events: list[dict]) -> list[str]:
    return [e["event"] for e in events]


async def test_pooled_job_completes_and_replans_when_a_model_finishes(executor) -> None:
    ex, launcher = executor
    sink = Sink()
    ex.submit("pooled", chat("tiny-a", 4, 8) + chat("tiny-b", 24, 96), sink)
    await asyncio.wait_for(ex.wait("pooled"), 500)
    got = sink.once()
    assert len(got) == 28 and all(o.ok for o in got.values()), [o.error for o in got.values()]
    for o in got.values():  # vLLM's own response bodies, lengths as asked
        assert o.response_body["model"] == o.model
        assert o.response_body["usage"]["completion_tokens"] == (8 if o.model == "tiny-a" else 96)
    ev = ex.events("pooled")
    first = next(e["model"] for e in ev if e["event"] == "model_finished")
    replans = [e for e in ev if e["event"] == "replan"]
    assert any(f"model_finished:{first}" in e["reasons"] for e in replans), ev
    assert first not in replans[-1]["remaining"]
    started = [e for e in ev if e["event"] == "engine_started"]
    assert {e["model"] for e in started} == {"tiny-a", "tiny-b"}
    assert all(e["pid"] for e in started)
    # the pass after the last outcome keeps the engines warm for LINGER_S, then stops them
    for _ in range(50):
        if ex.health()["idle_engines"]:
            break
        await asyncio.sleep(0.02)
    assert {e["model"] for e in ex.health()["idle_engines"]} <= {"tiny-a", "tiny-b"}
    assert launcher.running() and ex.health()["idle_engines"]
    for _ in range(100):
        if not launcher.running():
            break
        await asyncio.sleep(0.2)
    assert launcher.running() == [] and ex.health()["idle_engines"] == []


async def test_killed_engine_process_does_not_lose_the_batch(executor) -> None:
    ex, launcher = executor
    sink = Sink()
    ex.submit("kill", chat("tiny-a", 24, 16, step=32), sink)
    while len(sink.outcomes) < 2 or not launcher.running("tiny-a"):
        await asyncio.sleep(0.1)
    victim = launcher.running("tiny-a")[0]
    os.kill(victim.pid, signal.SIGKILL)
    await asyncio.wait_for(ex.wait("kill"), 500)
    got = sink.once()
    assert len(got) == 24 and all(o.ok for o in got.values()), [o.error for o in got.values()]
    assert any(o.attempts > 1 for o in got.values())  # the killed engine's requests were re-run
    ev = ex.events("kill")
    failed = [e for e in ev if e["event"] == "engine_failed"]
    assert failed and failed[0]["pid"] == victim.pid
    assert sum(e["event"] == "engine_started" for e in ev) >= 2  # a replacement engine


async def test_cancel_mid_run_frees_every_engine(executor) -> None:
    ex, launcher = executor
    sink = Sink()
    ex.submit("cancel", chat("tiny-a", 40, 8, step=24) + chat("tiny-b", 40, 8, step=24), sink)
    while not sink.outcomes:
        await asyncio.sleep(0.1)
    await asyncio.wait_for(ex.cancel("cancel"), 120)
    assert len(sink.once()) < 80
    # nothing else has work: the engines stay warm for LINGER_S at most, then every one is freed.
    # An engine stops being alive() when its stop begins; its process group is gone when the stop
    # ends (SIGTERM, up to 30 s of grace, then SIGKILL), so wait for both, bounded by that.
    def leftovers() -> list[int]:
        return [pid for e in launcher.engines for pid in group_pids(e.pid)]

    for _ in range(int((LINGER_S + 35) * 10)):
        if not launcher.running() and not leftovers():
            break
        await asyncio.sleep(0.1)
    assert launcher.running() == []
    assert leftovers() == []
    await asyncio.wait_for(ex.wait("cancel"), 1)


async def test_a_small_batch_preempts_running_requests_of_a_big_one(executor) -> None:
    """vLLM admits a request only as one of its 32 running ones leaves: a small batch arriving
    while a big one holds every seat gets every request the big one has in flight aborted, and
    the engine to itself while it runs (`runtime.executor.seats`). The real engine aborts them
    when their connection closes; each is re-run and answered once, at the length asked."""
    ex, _ = executor
    big, small = Sink(), Sink()
    # lengths 40-55 tokens: answers leave a few at a time and the engine's seats stay full. With
    # one length all 32 leave at one step, and a small batch arriving while the event loop was
    # still taking their answers found only 22 in flight (CI, 5 Dec 2026)
    heavy = chat("tiny-a", 400, 40)
    for i, w in enumerate(heavy):
        w.max_tokens = w.body["max_tokens"] = 40 + i % 16
    asked = {w.custom_id: w.max_tokens for w in heavy}
    ex.submit("big", heavy, big)
    while not big.outcomes:
        await asyncio.sleep(0.05)
    few = chat("tiny-a", 5, 16)
    for w in few:
        w.custom_id = f"s-{w.custom_id}"
    ex.submit("small", few, small)
    await asyncio.wait_for(ex.wait("small"), 120)
    await asyncio.wait_for(ex.wait("big"), 500)
    got = big.once() | small.once()
    assert len(got) == 405 and all(o.ok for o in got.values()), [o.error for o in got.values()]
    for o in got.values():
        assert o.response_body["usage"]["completion_tokens"] == asked.get(o.custom_id, 16)
    ev = [e for e in ex.events("small") if e["event"] == "requests_preempted"]
    assert ev and {b for e in ev for b in e["preempted_batches"]} == {"big"}
    requeued = sum(e["requeued"] for e in ev)
    # every seat and those waiting in the engine (`slots.limit`), on one engine or both (DP 2)
    assert 32 <= requeued <= 96
    assert sum(o.attempts > 1 for o in got.values()) == requeued
