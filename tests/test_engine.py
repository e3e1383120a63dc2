"""Real vLLM engines: tiny models load and generate, the chat template is applied, two engines pinned
to different cores run at once, and stopping leaves no process or shared memory behind.

Two engines (tiny-a on core 0, tiny-b on core 1) are shared by the whole module; the last test stops
them and checks the cleanup.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from runtime.config import Config
from runtime.engines.api_server import ENGINE_MAIN, FORK_ENV
from runtime.engines.devices import discover_pool
from runtime.engines.engine import (Engine, EngineError, EngineSpec, VllmLauncher, build_command,
                                    shm_files)
from runtime.engines.procs import group_cpu_s, group_pids

pytestmark = pytest.mark.engine
aio = pytest.mark.asyncio(loop_scope="session")

REPO = Path(__file__).resolve().parent.parent


def _spec(cfg: Config, name: str, cores: tuple[int, ...], tp: int = 1, **model_changes) -> EngineSpec:
    m = cfg.model(name)
    assert m is not None
    if model_changes:
        m = dataclasses.replace(m, **model_changes)  # not __dict__: it caches served_endpoints
    return EngineSpec(model=m, model_path=m.resolved_path(cfg.base_dir), devices=cores, tp=tp,
                      kv_cache_gib=cfg.devices.cpu_kvcache_gib,
                      log_path=cfg.state_dir / "logs" / f"{name}-{'-'.join(map(str, cores))}.log")


@pytest.fixture(scope="module")
async def pair(test_config: Config):
    """tiny-a pinned to core 0 and tiny-b pinned to core 1, started concurrently."""
    launcher = VllmLauncher()
    a, b = await asyncio.gather(launcher.launch(_spec(test_config, "tiny-a", (0,))),
                                launcher.launch(_spec(test_config, "tiny-b", (1,))))
    yield a, b
    await asyncio.gather(a.stop(), b.stop())


def _chat(model: str, text: str, max_tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0}


@aio
async def test_tiny_models_generate(pair):
    a, b = pair
    for eng in (a, b):
        status, body = await eng.post("/v1/chat/completions",
                                      _chat(eng.spec.model.name, "count to three", 16))
        assert status == 200, body
        assert body["model"] == eng.spec.model.name
        assert body["usage"]["completion_tokens"] == 16
        assert body["choices"][0]["message"]["content"]
    status, body = await a.post("/v1/completions", {"model": "tiny-a", "prompt": "once upon",
                                                   "max_tokens": 5, "ignore_eos": True})
    assert status == 200 and body["usage"]["completion_tokens"] == 5


@aio
async def test_chat_template_applied(pair, tiny_model_dir: Path):
    from transformers import AutoTokenizer

    a, _ = pair
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "tiny-a")
    expected = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]
    status, body = await a.post("/tokenize", {"model": "tiny-a", "messages": messages})
    assert status == 200, body
    assert body["tokens"] == expected
    assert body["tokens"][0] == tok.bos_token_id
    assert tok.convert_tokens_to_ids("<|assistant|>") == body["tokens"][-2]
    status, body = await a.post("/v1/chat/completions", {**_chat("tiny-a", "", 1), "messages": messages})
    assert status == 200 and body["usage"]["prompt_tokens"] == len(expected)


@aio
async def test_invalid_request_returns_engine_error_body(pair):
    a, _ = pair
    status, body = await a.post("/v1/chat/completions", _chat("tiny-a", "hi", 5000))
    assert status == 400
    assert "error" in body and body["error"]["message"]


def _bound_cores(pgid: int) -> set[str]:
    """Cpus_allowed_list of every thread in the group that is pinned to a strict subset of cores."""
    every = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    out = set()
    for pid in group_pids(pgid):
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            except OSError:
                continue
            line = next(x for x in status.splitlines() if x.startswith("Cpus_allowed_list"))
            allowed = line.split(":")[1].strip()
            if allowed != every and allowed != "0-1":
                out.add(allowed)
    return out


@aio
async def test_engines_pinned_to_their_cores(pair):
    a, b = pair
    assert _bound_cores(a.pid) == {"0"}
    assert _bound_cores(b.pid) == {"1"}


def _all_affinities(pgid: int) -> set[frozenset[int]]:
    """The CPU affinity of every thread of every process in the group."""
    out = set()
    for pid in group_pids(pgid):
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                out.add(frozenset(os.sched_getaffinity(int(tid))))
            except OSError:
                continue
    return out


@aio
async def test_whole_engine_confined_to_its_cores(pair):
    """Not only the OpenMP threads: the API server and the engine core (which spins on
    sched_yield waiting for its worker) stay on the engine's core too."""
    a, b = pair
    assert _all_affinities(a.pid) == {frozenset({0})}
    assert _all_affinities(b.pid) == {frozenset({1})}


@aio
async def test_one_core_engines_fork_their_engine_core_and_worker(pair):
    """One core per rank: vLLM's engine core and worker are forked from the API server, not
    spawned to import torch and vLLM again (`runtime.engines.api_server`), and the worker takes
    the core and thread count vLLM's OpenMP setup meant for it."""
    a, b = pair
    for engine, core in ((a, 0), (b, 1)):
        log = engine.log_path.read_text()
        assert f"kept to cores [{core}], 1 thread(s)" in log


@aio
async def test_engine_starts_in_a_spare_process(test_config: Config, tmp_path: Path):
    """A ready spare (vLLM's API server imported) becomes the engine: it serves, keeps to its core
    and niceness like a spawned engine, is replaced once the engine is up, and nothing of either
    is left after stop/close."""
    from runtime.engines.engine import base_env
    from runtime.engines.spares import SparePool

    pool = SparePool(1, tmp_path / "spares", base_env)
    launcher = VllmLauncher(spares=pool)
    await launcher.start()
    assert await pool.wait_ready(180) == 1
    spare_pid = pool._spares[0].pid
    spec = EngineSpec(**{**_spec(test_config, "tiny-a", (1,)).__dict__, "nice": 3,
                         "log_path": tmp_path / "engine.log"})
    launch = asyncio.create_task(launcher.launch(spec))
    await asyncio.sleep(0.5)
    assert launcher.in_spare(spec)  # a re-plan during the start knows it skips the import
    engine = await launch
    assert not launcher.in_spare(spec)  # asked only while it starts
    try:
        assert engine.spare_used and engine.pid == spare_pid
        status, body = await engine.post("/v1/chat/completions", _chat("tiny-a", "hello", 4))
        assert status == 200 and body["usage"]["completion_tokens"] == 4
        assert _all_affinities(engine.pid) - {frozenset({0, 1})} == {frozenset({1})}
        base = os.getpriority(os.PRIO_PROCESS, 0)
        workers = [p for p in group_pids(engine.pid) if p != engine.pid]  # all but the guard
        assert {os.getpriority(os.PRIO_PROCESS, p) for p in workers} == {base + 3}
        assert "(in spare process" in engine.log_path.read_text()
        assert "kept to cores [1], 1 thread(s)" in engine.log_path.read_text()  # forked worker
        assert len(pool._spares) == 1 and pool._spares[0].pid != spare_pid  # replaced
        replacement = pool._spares[0].pid
    finally:
        await engine.stop()
        await launcher.close()
    assert not group_pids(engine.pid) and not group_pids(replacement)


def test_confined_cores_only_for_cpu_engines(test_config: Config):
    spec = _spec(test_config, "tiny-a", (1,))
    assert spec.confined_cores() == (1,)
    assert EngineSpec(**{**spec.__dict__, "confine": False}).confined_cores() == ()
    assert EngineSpec(**{**spec.__dict__, "device_kind": "cuda"}).confined_cores() == ()


@aio
async def test_start_failure_raises_with_log_tail(test_config: Config, tmp_path: Path):
    spec = _spec(test_config, "tiny-a", (0,), engine_args={"no_such_vllm_flag": 1})
    spec = EngineSpec(**{**spec.__dict__, "log_path": tmp_path / "bad.log"})
    eng = Engine(spec)
    with pytest.raises(EngineError, match="no-such-vllm-flag"):
        await eng.start(timeout_s=120)
    assert not eng.alive() and not group_pids(eng.pid)


@aio
async def test_a_frozen_engine_uses_no_cpu_and_serves_once_thawed(pair):
    """Sleep on CPU (`Engine.freeze`): every process but the guard stopped, none using CPU, the
    memory kept; thawed, it answers at once."""
    a, _ = pair
    assert a.freezable and a.memory_bytes() > 100 * 2**20
    assert a.freeze() and a.frozen
    others = [p for p in group_pids(a.pid) if p != a.pid]
    for _ in range(100):  # a signal is delivered asynchronously: a running one stops in a moment
        if {_state(p) for p in others} == {"T"}:
            break
        await asyncio.sleep(0.01)
    assert len(others) >= 3 and {_state(p) for p in others} == {"T"}
    assert _state(a.pid) != "T"  # the guard keeps watching the gateway
    cpu = group_cpu_s(a.pid)
    await asyncio.sleep(1.0)
    assert group_cpu_s(a.pid) - cpu < 0.05
    assert a.thaw() and not a.frozen
    t0 = time.monotonic()
    status, body = await a.post("/v1/chat/completions", _chat("tiny-a", "still there?", 8))
    assert status == 200 and body["usage"]["completion_tokens"] == 8
    assert time.monotonic() - t0 < 5
    # as a guest on another core (`Engine.pin`), every thread but the guard's moves, and back
    a.pin((1,))
    others = {frozenset(os.sched_getaffinity(int(t))) for p in group_pids(a.pid) if p != a.pid
              for t in os.listdir(f"/proc/{p}/task")}
    assert others == {frozenset({1})}
    status, _ = await a.post("/v1/chat/completions", _chat("tiny-a", "over there", 4))
    assert status == 200
    a.pin((0,))
    assert _all_affinities(a.pid) == {frozenset({0})}


@aio
async def test_stop_leaves_no_processes_or_shared_memory(pair):
    """Also for a frozen engine: it is stopped as quickly (SIGCONT after the SIGTERM), not killed
    after the guard's grace period."""
    a, b = pair
    pids = [p for e in (a, b) for p in group_pids(e.pid)]
    assert len(pids) >= 4  # api server + engine core + worker, per engine
    shm = shm_files(pids)  # vLLM's message queues; /dev/shm is shared with other engines
    assert shm
    assert a.freeze()
    t0 = time.monotonic()
    await asyncio.gather(a.stop(), b.stop())
    assert time.monotonic() - t0 < 10  # frozen, it took 20.4 s (the guard's SIGKILL)
    await a.stop()  # idempotent
    assert not a.alive() and not b.alive()
    assert not group_pids(a.pid) and not group_pids(b.pid)
    assert not any(os.path.exists(f"/proc/{p}") and "Z" not in _state(p) for p in pids)
    assert not [p for p in shm if os.path.exists(p)]


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "Z"
    return stat[stat.rindex(")") + 2]


CHILD = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from runtime.config import ModelConfig
    from runtime.engines.engine import Engine, EngineSpec
    async def main():
        m = ModelConfig(name="tiny-a", path=sys.argv[1], max_model_len=512, max_num_seqs=4,
                        max_num_batched_tokens=512, engine_args={"enforce_eager": True})
        e = Engine(EngineSpec(model=m, model_path=Path(sys.argv[1]), devices=(0,),
                              kv_cache_gib=0.1, log_path=Path(sys.argv[2])))
        await e.start()
        assert e.freeze()
        print(e.pid, flush=True)
        await asyncio.sleep(600)
    asyncio.run(main())
""")


def test_killed_parent_takes_its_engine_down(tiny_model_dir: Path, tmp_path: Path):
    """A SIGKILLed gateway cannot run cleanup code: PR_SET_PDEATHSIG must take the engine down,
    asleep (frozen) too: its guard sends SIGCONT after the SIGTERM, so it goes well before the
    guard's grace period (20 s) would SIGKILL it."""
    parent = subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_model_dir / "tiny-a"),
                               str(tmp_path / "child.log")], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    try:
        line = parent.stdout.readline()
        assert line.strip().isdigit(), (tmp_path / "child.log").read_text()[-3000:]
        pgid = int(line)
        shm = shm_files(group_pids(pgid))
        assert shm
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 12
        while group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not group_pids(pgid)
        assert not [p for p in shm if os.path.exists(p)]
    finally:
        parent.kill()


SPARE_CHILD = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from runtime.config import ModelConfig
    from runtime.engines.engine import EngineSpec, VllmLauncher, base_env
    from runtime.engines.spares import SparePool
    async def main():
        m = ModelConfig(name="tiny-a", path=sys.argv[1], max_model_len=512, max_num_seqs=4,
                        max_num_batched_tokens=512, engine_args={"enforce_eager": True})
        pool = SparePool(1, Path(sys.argv[2]), base_env)
        launcher = VllmLauncher(spares=pool)
        await launcher.start()
        await pool.wait_ready(180)
        e = await launcher.launch(EngineSpec(model=m, model_path=Path(sys.argv[1]), devices=(0,),
                                             kv_cache_gib=0.1, log_path=Path(sys.argv[2]) / "e.log"))
        assert e.spare_used
        await pool.wait_ready(30)
        print(e.pid, pool.zygote.pid, pool._spares[0].pid, flush=True)
        await asyncio.sleep(600)
    asyncio.run(main())
""")


def test_killed_parent_takes_its_spares_engines_and_zygote_down(tiny_model_dir: Path, tmp_path: Path):
    """An engine started in a spare is not the gateway's child but the zygote's grandchild: its
    guard watches the gateway, so a SIGKILLed gateway still takes it down, with the zygote and the
    spare not taken yet, and what the engine had in /dev/shm."""
    parent = subprocess.Popen([sys.executable, "-c", SPARE_CHILD, str(tiny_model_dir / "tiny-a"),
                               str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = parent.stdout.readline()
        assert len(line.split()) == 3, (tmp_path / "e.log").read_text()[-3000:]
        groups = [int(x) for x in line.split()]
        assert all(group_pids(g) for g in groups)
        shm = shm_files(group_pids(groups[0]))
        assert shm
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 60
        while any(group_pids(g) for g in groups) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for g in groups for p in group_pids(g)]
        assert not [p for p in shm if os.path.exists(p)]
    finally:
        parent.kill()


def test_build_command_cpu_and_cuda(test_config: Config):
    cmd, env = build_command(_spec(test_config, "small", (0, 1), tp=2), port=1234)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
    assert cmd[cmd.index("--served-model-name") + 1] == "small"
    assert cmd[cmd.index("--kv-cache-memory-bytes") + 1] == str(1 << 28)
    assert "--enforce-eager" in cmd and "--enable-prefix-caching" in cmd
    assert "--enable-prompt-tokens-details" in cmd  # cached_tokens in every response's usage
    # the gateway's fair order reaches into the engine's own queue (`Req.priority`)
    assert cmd[cmd.index("--scheduling-policy") + 1] == "priority"
    off = dataclasses.replace(test_config.model("small"),
                              engine_args={"enable_prefix_caching": False})
    assert not off.prefix_caching and test_config.model("small").prefix_caching
    cmd, _ = build_command(dataclasses.replace(_spec(test_config, "small", (0,)), model=off), 1)
    assert "--no-enable-prefix-caching" in cmd and "--enable-prefix-caching" not in cmd
    assert env["HF_HUB_OFFLINE"] == "1"
    gpu = EngineSpec(**{**_spec(test_config, "small", (2, 3), tp=2).__dict__, "device_kind": "cuda"})
    cmd, env = build_command(gpu, port=1)
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and "--gpu-memory-utilization" in cmd
    assert FORK_ENV not in env


def test_only_one_core_ranks_fork(test_config: Config, monkeypatch):
    """Fork (`runtime.engines.api_server`) where each rank has one core; a rank on several keeps
    vLLM's spawn (its threads need the per-thread binding only a fresh process takes)."""
    monkeypatch.setenv(FORK_ENV, "1")  # the gateway's own environment decides nothing
    forks = {(cores, tp): build_command(_spec(test_config, "small", cores, tp=tp), 1)[1].get(FORK_ENV)
             for cores, tp in (((0,), 1), ((0, 1), 2), ((0, 1), 1))}
    assert forks == {((0,), 1): "1", ((0, 1), 2): "1", ((0, 1), 1): None}
    cmd, _ = build_command(_spec(test_config, "small", (0,)), 1)
    assert cmd[cmd.index(ENGINE_MAIN) - 1] == "-m"


def test_discover_pool_cpu(test_config: Config):
    pool = discover_pool(test_config)
    assert pool.kind == "cpu" and pool.ids == (0, 1)
    assert pool.memory_bytes == 1 << 28
