"""`samullm profile`: measure a model's per-iteration latency on this machine and store the fit.

How: a worker subprocess (so vLLM's env is set before it is imported) builds an in-process engine
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`: the engine core and its scheduler live in the worker, the model
runs in vLLM's mp worker process with the same OpenMP core binding as a served engine), feeds it
controlled request sets with `llm_engine.add_request` and times each engine-core step (schedule +
forward + update; the output processing a served engine does in its API server process is timed
apart and not fitted). The engine arguments are the model's own (`engine_args`: eager or compiled,
as the runtime starts it), stored in the profile's meta. The batch
composition of every step is read from vLLM's own scheduler output (tokens scheduled per request and
how many each had computed before), so the features are exact even with chunked prefill. The
samples are fitted with `scheduler.latency.fit_latency_model`; the engine start time is measured
separately as the time to a healthy api_server (`runtime.engines.engine.Engine`), what the runtime pays.
That started engine then serves three synthetic request sets (`calibration_sets`: prefill-heavy,
decode-heavy, mixed), timed end to end as a benchmark or the runtime sees them, and
`scheduler.calibration.fit_served_scales` scales the fit's per-token terms (c1, c2) and per-step
terms (c0, c3, c4) so its simulation matches them: a served engine is slower than the in-process
steps, and not uniformly (with TP over both cores of this machine its API server and engine-core
processes have no core of their own, and prefill-heavy sets slowed most; a tiny model's per-step
Python overhead dominates its compute). Each set runs 3 times: the scales fit the fastest warm repeat;
the first run's excess, per step token count new to the engine, is the cold-shape cost
(`new_shape_s`: a fresh engine runs its first steps of each new size ~2x slower in total on a
64-request set). The unscaled fit and the per-set errors before and after go into the meta.

The sweep (prefill-heavy, decode-heavy, mixed arrivals, batch sizes 1…max_num_seqs) takes about a
minute on the tiny models; `--quick` halves it.

Long: the profiler's sweep, its served calibration and its CLI; it is a tool run by hand, not
on the request path.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np

from runtime.config import Config, ConfigError, ModelConfig, load_config
from runtime.engines.devices import discover_pool, engine_device_kind
from runtime.engines.engine import Engine, EngineSpec, base_env, child_setup, cpu_bind_string
from runtime.engines.spares import SparePool
from runtime.executor.planning import model_specs
from runtime.persist import save_profile
from scheduler.calibration import CalibrationSet, fit_served_scales
from scheduler.latency import IterationSample, Profile, fit_latency_model, relative_errors
from scheduler.simulator import EngineLimits, kv_blocks


@dataclass(frozen=True)
class Case:
    """A request set fed to the engine: (step at which it is added, prompt tokens, output tokens)."""

    name: str
    requests: tuple[tuple[int, int, int], ...]


def default_sweep(max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int,
                  quick: bool = False) -> list[Case]:
    """Shapes that exercise every feature of the latency model within the engine's limits."""
    cap = max_model_len - 2
    long_p = min(cap - 64, max(256, max_model_len * 3 // 4))
    batches = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= max_num_seqs}
                     | {max_num_seqs})
    if quick:
        batches = batches[::2] if batches[::2][-1] == max_num_seqs else batches[::2] + [max_num_seqs]
    out_len = 24 if quick else 48
    cases = []
    # prefill-heavy: long prompts, few output tokens (also chunked when > the token budget)
    for b, p in ((1, long_p), (4, long_p // 2), (8, 64), (2, min(cap - 8, 2 * max_num_batched_tokens)),
                 (16, 200)):
        cases.append(Case(f"prefill b={b} p={p}", tuple((0, p, 4) for _ in range(b))))
    # decode-heavy: every batch size, short and long contexts
    for b in batches:
        cases.append(Case(f"decode b={b} p=16", tuple((0, 16, out_len) for _ in range(b))))
    for b in batches[::2]:
        p = min(long_p, cap - out_len)
        cases.append(Case(f"decode b={b} p={p}", tuple((0, p, out_len) for _ in range(b))))
    # mixed: requests arriving while others decode (prefill chunks share steps with decodes)
    n = min(max_num_seqs, 24)
    cases.append(Case(f"mixed n={n}", tuple((3 * i, 32 + (97 * i) % max(1, long_p // 2),
                                               out_len // 2 + (13 * i) % out_len) for i in range(n))))
    return cases


# --------------------------------------------------------------------------------------------
# worker side (runs in a subprocess: `python -m tools.profiler WORKER_JSON`)

def _worker(job: dict) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=job["model_path"], dtype=job["dtype"], max_model_len=job["max_model_len"],
              max_num_seqs=job["max_num_seqs"], max_num_batched_tokens=job["max_num_batched_tokens"],
              tensor_parallel_size=job["tp"], kv_cache_memory_bytes=job["kv_bytes"],
              enable_prefix_caching=False, distributed_executor_backend="mp",
              disable_log_stats=True, seed=0, **job["engine_args"])
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    steps: list[dict] = []
    current: dict = {}

    original = scheduler.schedule

    def schedule_and_record(*a, **kw):  # wraps vLLM's schedule(): what ran in this step, exactly
        before = {rid: (r.num_computed_tokens, r.num_prompt_tokens)
                  for rid, r in scheduler.requests.items()}
        out = original(*a, **kw)
        tokens = prefill_work = decode_ctx = 0
        for rid, n in out.num_scheduled_tokens.items():
            computed, prompt = before.get(rid, (0, n))
            tokens += n
            if computed >= prompt:  # decode: attends to everything computed plus the new token
                decode_ctx += computed + n
            else:
                prefill_work += n * (computed + n / 2.0)
        current.update(tokens=tokens, prefill=prefill_work, decode=decode_ctx,
                       batch=len(out.num_scheduled_tokens))
        return out

    scheduler.schedule = schedule_and_record

    # What a served engine pays per iteration is its engine core's serial loop: schedule, run the
    # model in the worker, update from its output. Its API server detokenizes and answers in another
    # process, overlapped with the next step; here that work (`process_outputs`) runs in the same
    # process after each core step, so it is timed apart and left out of the fitted time.
    core_client = engine.engine_core
    get_output = core_client.get_output

    def timed_get_output(*a, **kw):
        t = time.perf_counter()
        out = get_output(*a, **kw)
        current["core_s"] = time.perf_counter() - t
        return out

    core_client.get_output = timed_get_output
    vocab = llm.get_tokenizer().vocab_size if hasattr(llm, "get_tokenizer") else 2000
    ids_rng = __import__("random").Random(0)

    def run_case(case: dict, tag: str) -> list[dict]:
        recorded: list[dict] = []
        pending = sorted(case["requests"])
        step_no, added, finished = 0, 0, 0
        while finished < len(pending):
            while added < len(pending) and pending[added][0] <= step_no:
                _, p, o = pending[added]
                prompt = {"prompt_token_ids": [ids_rng.randrange(10, vocab - 1) for _ in range(p)]}
                engine.add_request(f"{case['name']}-{added}-{tag}", prompt,
                                   SamplingParams(max_tokens=o, ignore_eos=True, temperature=1.0))
                added += 1
            current.clear()
            t0 = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t0
            finished += sum(1 for o in outs if o.finished)
            step_no += 1
            if current.get("tokens"):
                recorded.append({**current, "step_s": dt})
        return recorded

    cases = job["cases"]
    run_case(cases[0], "warm-up")  # the first steps pay one-off allocation costs
    for i, case in enumerate(cases):
        # vLLM schedules a case the same way every time, so repeats line up step by step; the
        # fastest repeat of each step is the least disturbed by other processes on shared cores.
        runs = [run_case(case, f"r{r}") for r in range(job.get("repeats", 1))]
        for j, step in enumerate(runs[0]):
            same = [run[j] for run in runs if len(run) == len(runs[0])]
            steps.append({**step, "core_s": min(x["core_s"] for x in same),
                          "step_s": min(x["step_s"] for x in same)})
        print(f"PROGRESS {i + 1} {len(cases)}", flush=True)
    Path(job["out"]).write_text(json.dumps(steps))


# --------------------------------------------------------------------------------------------
# parent side

def measure_iterations(model: ModelConfig, model_path: Path, devices: tuple[int, ...], tp: int,
                       kv_bytes: int, cases: list[Case], work_dir: Path,
                       progress: bool = True, repeats: int = 2) -> list[IterationSample]:
    """Run the sweep in a worker subprocess pinned like a served engine; return timed iterations."""
    work_dir.mkdir(parents=True, exist_ok=True)
    threads = len(devices) // tp  # cores per rank
    shape = f"tp{tp}" if threads == 1 else f"tp{tp}-t{threads}"
    out = work_dir / f"steps-{model.name}-{shape}.json"
    job = {"model_path": str(model_path), "dtype": model.dtype, "max_model_len": model.max_model_len,
           "max_num_seqs": model.max_num_seqs, "max_num_batched_tokens": model.max_num_batched_tokens,
           "tp": tp, "kv_bytes": kv_bytes, "engine_args": dict(model.engine_args),
           "cases": [{"name": c.name, "requests": list(c.requests)} for c in cases], "out": str(out),
           "repeats": repeats}
    # the engines' environment, but with the engine core in the worker process: the sweep times
    # each scheduler step from inside it (see the module docstring)
    env = base_env() | {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                        "VLLM_CPU_OMP_THREADS_BIND": cpu_bind_string(devices, tp)}
    log_path = work_dir / f"profile-{model.name}-{shape}.log"
    bar = _bar(len(cases), f"profile {model.name} tp={tp}", progress)
    with open(log_path, "w") as log:
        # on its cores only, like a confined served engine (EngineSpec.confined_cores), at this
        # process's priority (a background run's 19), and gone with this process
        proc = subprocess.Popen([sys.executable, "-m", "tools.profiler", json.dumps(job)],
                                stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                start_new_session=True, preexec_fn=child_setup(0, devices))
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("PROGRESS"):
                    bar.update(1)
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
            bar.close()
    if rc != 0:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"profiling worker failed (exit {rc}); log {log_path}:\n{tail}")
    return read_steps(out)


def read_steps(path: Path, timing: str = "core_s") -> list[IterationSample]:
    """The timed iterations a worker wrote: `core_s` (engine-core step, what a served engine pays;
    the default) or `step_s` (core step + in-process output processing)."""
    return [IterationSample(num_tokens=s["tokens"], prefill_attn_work=s["prefill"],
                            decode_ctx_sum=s["decode"], batch_size=s["batch"], seconds=s[timing])
            for s in json.loads(Path(path).read_text())]


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="case", disable=not enabled, file=sys.stderr)


async def measure_start_time(spec: EngineSpec, timeout_s: float = 600, spare: bool = False) -> float:
    """Seconds from spawning the api_server (or handing a ready spare process its command line,
    `runtime.engines.spares`) to a healthy /health (then stops it)."""
    return (await measure_served(spec, [], timeout_s, spare=spare))[0]


def calibration_sets(max_num_seqs: int, max_model_len: int,
                     max_num_batched_tokens: int) -> list[tuple[str, list[tuple[int, int]]]]:
    """(name, [(prompt, output), ...]) of the served-engine calibration: three synthetic shapes
    (lengths from fixed arithmetic sequences, not drawn from any benchmark's set), so that the
    per-token and per-step scales (`scheduler.calibration`) are both pinned down:
    prefill-heavy (long prompts, 4 output tokens), decode-heavy (short prompts, long outputs, one
    full batch) and mixed (twice max_num_seqs requests: admission waves, chunked prefills sharing
    steps with decodes)."""
    n = max_num_seqs
    lo_p, hi_p = max(8, max_model_len // 8), max(16, max_model_len // 2)
    long_o = max(8, min(max_model_len // 8, max_model_len - 64))
    prefill = [(lo_p + (i * 97) % (hi_p - lo_p + 1), 4) for i in range(n)]
    decode = [(min(32, max_model_len // 4), long_o)] * n
    mixed = [(16 + (i * 61) % (hi_p - 15), 8 + (i * 37) % (long_o - 7)) for i in range(2 * n)]
    return [("prefill", prefill), ("decode", decode), ("mixed", mixed)]


async def _post_retrying(engine: Engine, body: dict, tries: int = 3) -> tuple[int, dict]:
    """engine.post, sent again when a kept-alive connection turns out closed by the server (a
    live engine answers 'Server disconnected' for a stale connection; the retry costs ~ms)."""
    for attempt in range(tries):
        try:
            return await engine.post("/v1/completions", body)
        except aiohttp.ServerDisconnectedError:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


async def measure_served(spec: EngineSpec, sets: list[list[tuple[int, int]]],
                         timeout_s: float = 600, runs: int = 3,
                         spare: bool = False) -> tuple[float, list[tuple[float, float]]]:
    """(start seconds, for each set (its first run's seconds, the fastest of its other `runs` − 1
    runs') to finish its requests sent at once) on a real api_server, as the runtime drives it:
    token-id prompts, `ignore_eos`, `max_tokens` = output. The first run of a set pays for step
    shapes new to the engine (`scheduler.calibration`), the later ones run warm."""
    engine = Engine(spec)
    spares = None
    try:
        ready = None
        if spare:  # time the start the gateway sees: in a spare process that is ready
            log_dir = spec.log_path.parent if spec.log_path is not None else Path(".")
            spares = SparePool(1, log_dir, base_env)
            await spares.start()
            await spares.wait_ready(timeout_s)
            ready = spares.take()
        await engine.start(timeout_s, spare=ready)
        assert engine.start_time_s is not None
        rng = __import__("random").Random(0)
        times = []
        for requests in sets:
            first = best = None
            for r in range(max(2, runs)):
                bodies = [{"model": spec.model.name,
                           "prompt": [rng.randrange(10, 1000) for _ in range(p)],
                           "max_tokens": o, "ignore_eos": True, "temperature": 1.0}
                          for p, o in requests]
                t0 = time.perf_counter()
                results = await asyncio.gather(*(_post_retrying(engine, b) for b in bodies))
                elapsed = time.perf_counter() - t0
                if any(status != 200 for status, _ in results):
                    raise RuntimeError(f"calibration request failed: {results[0]}")
                if r == 0:
                    first = elapsed
                else:
                    best = elapsed if best is None else min(best, elapsed)
            assert first is not None and best is not None
            times.append((first, best))
        return engine.start_time_s, times
    finally:
        await engine.stop()
        if spares is not None:
            await spares.close()


def profile_model(cfg: Config, name: str, tp: int = 1, devices: tuple[int, ...] | None = None,
                  quick: bool = False, measure_start: bool = True, progress: bool = True,
                  repeats: int = 2, reuse_sweep: bool = False, threads: int = 1) -> Profile:
    """Measure, fit and store the profile of model `name` at TP `tp`, each rank on `threads` cores
    (`devices` then holds tp × threads cores, rank k on [k·threads, (k+1)·threads)); returns it.
    `reuse_sweep`: refit the steps an earlier sweep left in the work dir (when there) instead of
    sweeping again."""
    model = cfg.model(name)
    if model is None:
        raise ConfigError(f"--model: no model named {name!r} in the config")
    path = model.resolved_path(cfg.base_dir)
    if path is None:
        raise ConfigError(f"models[{name}].path: a plan-only model cannot be profiled")
    if not model.generates:
        raise ConfigError(f"models[{name}]: serves {', '.join(model.served_endpoints)}; the "
                          "profiler measures generation (/v1/completions)")
    pool = discover_pool(cfg)
    if threads < 1:
        raise ConfigError(f"--threads {threads}: must be >= 1")
    if devices is None:
        devices = pool.ids[:tp * threads]
    if len(devices) != tp * threads:
        raise ConfigError(f"--tp {tp} --threads {threads}: needs {tp * threads} devices, "
                          f"got {len(devices)}")
    if engine_device_kind(pool.kind) != "cpu":
        raise ConfigError("profiling drives CPU engines here; GPU profiles come from "
                          "scheduler.gpu_profiles")
    kv_bytes = int(cfg.devices.cpu_kvcache_gib * (1 << 30))
    cases = default_sweep(model.max_model_len, model.max_num_seqs, model.max_num_batched_tokens, quick)
    work = cfg.state_dir / "profiles" / "work"
    load_before = os.getloadavg()[0]  # recorded: a profile taken on a busy machine is suspect
    t0 = time.monotonic()
    shape = f"tp{tp}" if threads == 1 else f"tp{tp}-t{threads}"
    steps = work / f"steps-{model.name}-{shape}.json"
    if reuse_sweep and steps.exists():
        samples = read_steps(steps)
    else:
        samples = measure_iterations(model, path, devices, tp, kv_bytes, cases, work, progress,
                                     repeats)
    sweep_s = time.monotonic() - t0
    load_s = 0.0
    fit = fit_latency_model(samples)
    err = relative_errors(fit, samples)
    calib: dict = {}
    spare = False
    if measure_start:
        # the engine started to time its start also serves the calibration sets (tens of seconds)
        spec = EngineSpec(model=model, model_path=path, devices=devices, tp=tp,
                          kv_cache_gib=cfg.devices.cpu_kvcache_gib,
                          confine=cfg.devices.confine_cpu_engines,
                          log_path=work / f"start-{model.name}-{shape}.log")
        named = calibration_sets(model.max_num_seqs, model.max_model_len,
                                 model.max_num_batched_tokens)
        spare = cfg.devices.effective_spare_engines(pool.kind, len(pool.ids)) > 0
        load_s, served = asyncio.run(measure_served(spec, [r for _, r in named], spare=spare))
        sets = [CalibrationSet(n, tuple(r), warm, first)
                for (n, r), (first, warm) in zip(named, served)]
        mspec = model_specs(cfg, pool.kind)[name]
        limits = EngineLimits.for_spec(mspec, kv_blocks(mspec, tp, kv_bytes))
        cal = fit_served_scales(fit, limits, sets)
        calib = {"in_process_latency": fit.to_dict(), "served_calibration": cal.to_dict(),
                 "loadavg_1m_after": round(os.getloadavg()[0], 2)}
        fit = cal.apply(fit)
    fit = fit.with_load_time(load_s)

    profile = Profile(model=name, tp=tp, device=pool.signature, latency=fit, threads=threads, meta={
        "samples": len(samples), "sweep_s": round(sweep_s, 2), "devices": list(devices),
        "median_abs_rel_err": float(np.median(np.abs(err))),
        "p90_abs_rel_err": float(np.quantile(np.abs(err), 0.9)),
        "cpu": _cpu_name(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "load_time_measured": measure_start, "repeats": repeats, "start_in_spare": spare,
        # the compile mode etc. the profile holds for: a profile of a compiled engine does not
        # describe an eager one (callers compare this with the config they run)
        "engine_args": dict(model.engine_args), "timing": "core_s",
        "loadavg_1m": round(load_before, 2), **calib,
    })
    save_profile(cfg.state_dir, profile)
    return profile


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="conf/default.toml")
    p.add_argument("--model", required=True, help="a configured model name")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU cores per TP rank (OpenMP threads; VLLM_CPU_OMP_THREADS_BIND=0-1)")
    p.add_argument("--devices", default=None, help="comma-separated core ids (default: the first tp)")
    p.add_argument("--state-dir", default=None, help="overrides [server].state_dir")
    p.add_argument("--quick", action="store_true", help="a shorter sweep")
    p.add_argument("--repeats", type=int, default=2,
                   help="run each case this many times, keep each step's fastest time")
    p.add_argument("--no-start-time", action="store_true",
                   help="skip measuring engine start time (and with it the served calibration, "
                        "which runs on that engine)")


def profile_main(args: argparse.Namespace) -> int:

    cfg = load_config(args.config)
    if args.state_dir:
        cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, state_dir=args.state_dir))
    devices = tuple(int(x) for x in args.devices.split(",")) if args.devices else None
    prof = profile_model(cfg, args.model, args.tp, devices, quick=args.quick,
                         measure_start=not args.no_start_time, repeats=args.repeats,
                         threads=args.threads)
    lat = prof.latency
    print(f"{prof.model} tp={prof.tp} threads={prof.threads} {prof.device}: c0={lat.c0:.3e} "
          f"c1={lat.c1:.3e} c2={lat.c2:.3e} c3={lat.c3:.3e} c4={lat.c4:.3e} "
          f"load={lat.load_time_s:.1f}s "
          f"samples={prof.meta['samples']} median|err|={prof.meta['median_abs_rel_err']:.1%}")
    return 0


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
