"""Online calibration in the runtime: the executor records what its engines serve, refits the
latency model before each plan, keeps it in `<state_dir>/calibration.json` across restarts, and
`samullm plan` reads the same state and says where each shape's figures come from.

The engines are test doubles that serve like a regular vLLM engine (`FakeLauncher.step_s`: at most
max_num_seqs requests at once, each output token one step) at a speed the roofline does not know."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from cli.main import main
from cli.plan import read_requests
from runtime.config import load_config
from runtime.executor.executor import PoolExecutor
from runtime.executor.planning import model_specs
from runtime.executor.latency_source import DEFAULT_CPU_TP_COLD_S, LatencySource
from runtime.persist import CALIBRATION_FILE, load_calibration, save_start_times
from scheduler.latency import analytic_latency_model
from scheduler.online import ShapeFit, coefficients
from scheduler.planner import PlanningProblem, plan
from scheduler.types import DevicePool

from .fakes import FakeLauncher
from .executor_kit import ARCHS, Sink, items, make_cfg, run_once

pytestmark = pytest.mark.timeout(60)
STEP_S = 0.02  # the fake engines' seconds per output token: ~4.5x the roofline's step of model a


class Recorder:
    """A planner that keeps every problem it was given."""

    def __init__(self) -> None:
        self.problems: list[PlanningProblem] = []

    def __call__(self, problem: PlanningProblem, strategy: str):
        self.problems.append(problem)
        return plan(problem, strategy)


def uncalibrated(problem: PlanningProblem) -> PlanningProblem:
    """The same problem with the latency model the roofline alone gives."""
    assert isinstance(problem.latency, LatencySource)
    lat = dataclasses.replace(problem.latency, fits={})
    return dataclasses.replace(problem, latency=lat, threads_latency=lat.threads)


def one_core(cfg) -> DevicePool:
    return DevicePool("cpu", (0,), int(cfg.devices.cpu_kvcache_gib * 2**30))


def event_time(ex: PoolExecutor, batch: str, kind: str) -> float:
    return next(e["time"] for e in ex.events(batch) if e["event"] == kind)


def errors(problem: PlanningProblem, measured: float, what: str) -> tuple[float, float]:
    """The relative errors of the samullm plan's makespan for `problem`, calibrated and not. The
    fake engines stop at once: the stop time a plan prices before any stop was measured (the
    default) is left out, so that what is compared is the engines' serving."""
    out = []
    problem = dataclasses.replace(problem, stop_s=0.0)
    for p in (problem, uncalibrated(problem)):
        out.append((plan(p, "samullm").makespan_s - measured) / measured)
    print(f"\n{what}: measured {measured:.3f}s, predicted {out[0]:+.1%} calibrated, "
          f"{out[1]:+.1%} uncalibrated")
    return out[0], out[1]


async def test_the_next_batch_is_predicted_from_the_last_ones_engines(tmp_path: Path) -> None:
    """A batch on an engine 4-5x slower than the roofline: after it (and a restart), the next
    batch's first plan predicts its measured time within 20 %; uncalibrated it is ~75 % short."""
    cfg = make_cfg(tmp_path)
    pool = one_core(cfg)
    launcher = FakeLauncher(start_delay_s=0.02, step_s={"a": STEP_S}, output_tokens=16)
    await run_once(cfg, launcher, pool, items("a", 12, prefix="x"), Recorder(), "b1")
    log, fits = load_calibration(cfg.state_dir, 512)  # persisted by the executor's close
    (key,) = log.snapshot()
    assert key == ("a", 1, 1, "cpu") and log.snapshot()[key].seen == 12
    rec = Recorder()
    ex = await run_once(cfg, launcher, pool, items("a", 12, prefix="y"), rec, "b2")  # restarted
    measured = event_time(ex, "b2", "batch_finished") - event_time(ex, "b2", "batch_submitted")
    first = rec.problems[0]
    fix = first.latency.correction(first.models["a"], 1)
    assert fix is not None and fix.source == "online" and fix.step_scale > 2
    calibrated, before = errors(first, measured, f"batch 2 (scales {fix.token_scale:.2f}, "
                                f"{fix.step_scale:.2f})")
    assert abs(calibrated) < 0.2 and before < -0.5


async def test_a_batchs_first_answers_correct_its_own_later_stages(tmp_path: Path) -> None:
    """Two models on one core run one after the other: the re-plan when the first finishes
    predicts the second from the first one's served requests (derived: the second never ran)."""
    cfg = make_cfg(tmp_path)
    save_start_times(cfg.state_dir, {("a", 1, 1): 0.02, ("b", 1, 1): 0.02})
    specs = model_specs(cfg)
    # a machine on which the roofline is off by one factor for both models (what deriving one
    # model's correction from another's assumes): b's step costs what a's does times the
    # roofline's ratio of their steps
    ratio = _step(specs["b"]) / _step(specs["a"])
    launcher = FakeLauncher(start_delay_s=0.02, step_s={"a": STEP_S, "b": STEP_S * ratio},
                            output_tokens=16)
    rec = Recorder()
    ex = await run_once(cfg, launcher, one_core(cfg), items("a", 8) + items("b", 8, start=9),
                        rec)
    assert len(rec.problems) == 2
    replan = rec.problems[1]
    (left,) = replan.work  # the model that had not run yet
    fix = replan.latency.correction(replan.models[left], 1)
    assert fix is not None and fix.source == "derived" and "at this shape" in fix.detail
    # the re-plan's event says what the calibration held: the first model's fit at TP 1
    (event,) = [e for e in ex.events("b") if e["event"] == "replan"]
    ((shape, (token, step, served)),) = event["calibration"].items()
    (ran,) = {"a", "b"} - {left}
    assert shape == f"{ran} TP1" and served >= 8 and token > 0 and step > 0
    measured = event_time(ex, "b", "batch_finished") - event_time(ex, "b", "replan")
    calibrated, before = errors(replan, measured, f"{left} after the re-plan")
    assert abs(calibrated) < 0.25 and before < -0.5


def _step(spec) -> float:
    """The roofline's decode step of 4 sequences (make_cfg's max_num_seqs) of 40 tokens each."""
    return analytic_latency_model(spec, 1, "cpu").iteration_time(4, 0.0, 160, 4)


async def test_nothing_is_recorded_with_online_calibration_off(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    cfg = dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler,
                                                                 online_calibration=False))
    launcher = FakeLauncher(start_delay_s=0.02, step_s={"a": 0.001})
    rec = Recorder()
    await run_once(cfg, launcher, one_core(cfg), items("a", 12), rec)
    await run_once(cfg, launcher, one_core(cfg), items("a", 12, prefix="z"), rec, "b2")
    assert not (cfg.state_dir / CALIBRATION_FILE).exists()
    assert all(not p.latency.fits for p in rec.problems)


def test_an_unserved_tp_is_derived_from_the_models_served_one(tmp_path: Path) -> None:
    """`a` ran at TP 1 only, `b` at TP 1 and TP 2: a's TP 2 gets a's TP 1 scales times the TP 2 /
    TP 1 ratio b showed; the planner's latency and the provenance say so."""
    cfg = make_cfg(tmp_path)
    pool = DevicePool("cpu", (0, 1), 1 << 28)
    specs = {n: spec for n, spec in model_specs(cfg).items() if n in ("a", "b")}

    def fit(model: str, tp: int, token: float, step: float) -> ShapeFit:
        base = analytic_latency_model(specs[model], tp, "cpu")
        return ShapeFit(token, step, 40, 1, 10.0, 2.0, 10.0, "roofline", coefficients(base), 40)

    fits = {("a", 1, 1, "cpu"): dataclasses.replace(fit("a", 1, 2.0, 5.0), first_s=2.0),
            ("b", 1, 1, "cpu"): fit("b", 1, 1.0, 4.0), ("b", 2, 1, "cpu"): fit("b", 2, 1.5, 2.0)}
    src = LatencySource.load(tmp_path, pool, ["a", "b"], {("a", 1, 1): 10.0, ("a", 2, 1): 12.0}, fits)
    roof = analytic_latency_model(specs["a"], 2, "cpu")
    lat = src(specs["a"], 2)
    assert lat.c1 == pytest.approx(roof.c1 * 3.0) and lat.c0 == pytest.approx(roof.c0 * 2.5)
    # a's served TP 1 engines answered their first requests 2 s late once: charged with the start
    assert src(specs["a"], 1).load_time_s == 12.0 and lat.load_time_s == 12.0
    info = src.source(specs["a"], 2)
    assert info["source"] == "derived" and info["detail"] == "from a TP1 x TP2/TP1 of b"
    assert src.source(specs["a"], 1)["source"] == "online calibration"
    assert src.source(specs["b"], 1, 2)["source"] == "derived"  # 2 threads: b's TP 1
    assert LatencySource.load(tmp_path, pool, ["a"], {}).source(specs["a"], 2)["source"] == \
        "roofline"


def test_an_unreadable_calibration_file_is_ignored_with_a_warning(tmp_path: Path, caplog) -> None:
    for text in ("{not json", '["a list"]', '{"version": 1, "shapes": [{"model": "a"}]}',
                 json.dumps({"version": 1, "shapes": [{
                     "model": "a", "tp": 1, "threads": 1, "device": "cpu", "seen": 1, "runs": [],
                     "fit": {**_fit_dict(), "token_scale": float("nan")}}]})):
        (tmp_path / CALIBRATION_FILE).write_text(text)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="runtime.persist"):
            log, fits = load_calibration(tmp_path, 512)
        assert log.snapshot() == {} and fits == {}
        assert "ignoring unreadable calibration" in caplog.text
    cfg = make_cfg(tmp_path)  # an executor starts on it as on a fresh state dir
    cfg.state_dir.mkdir(parents=True)
    (cfg.state_dir / CALIBRATION_FILE).write_text("{not json")
    assert PoolExecutor(cfg, FakeLauncher()).learned.fits == {}


def _fit_dict() -> dict[str, Any]:
    return ShapeFit(1.0, 1.0, 8, 1, 1.0, 1.0, 1.0, "roofline", (0.0,) * 7, 8).to_dict()


async def test_the_executor_rewrites_calibration_only_when_it_learned_something(
        tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    pool = one_core(cfg)
    launcher = FakeLauncher(start_delay_s=0.02, step_s={"a": 0.001})
    await run_once(cfg, launcher, pool, items("a", 12), Recorder(), "b")
    path = cfg.state_dir / CALIBRATION_FILE
    assert path.exists()
    _, stored = load_calibration(cfg.state_dir, 512)
    assert stored  # fitted when the executor closed, and saved
    ex = PoolExecutor(cfg, launcher, pool=pool)
    path.unlink()
    await ex._calibrate()  # the stored fit is current: nothing learned, nothing written
    await ex.learned.save()
    assert ex.learned.fits == stored and not path.exists()


async def test_plan_reads_the_calibrated_state_and_says_where_figures_come_from(
        tmp_path: Path, capsys) -> None:
    """After a batch of tiny's served by engines 4-5x slower than the roofline: `samullm plan`
    predicts with the calibration (as `serve` would: the same makespan as a restarted executor's
    first plan), and names each shape's source."""
    models = "".join(
        f'[[models]]\nname = "{n}"\npath = "/nonexistent/{n}"\nmax_model_len = 1024\n'
        f'max_num_seqs = 4\nmax_num_batched_tokens = 1024\narch = {{ num_layers = {a["num_layers"]}, '
        f'hidden_size = {a["hidden_size"]}, num_heads = {a["num_heads"]}, num_kv_heads = '
        f'{a["num_kv_heads"]}, intermediate_size = {4 * a["hidden_size"]}, vocab_size = 2048 }}\n'
        for n, a in (("tiny", ARCHS["a"]), ("small", ARCHS["b"])))
    conf = tmp_path / "c.toml"
    conf.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n[devices]\nkind = "cpu"\n'
                    f'ids = [0, 1]\ncpu_kvcache_gib = 0.25\nspare_engines = 0\n'
                    f'[scheduler]\nsamples = 1\n{models}')
    cfg = load_config(str(conf))
    launcher = FakeLauncher(start_delay_s=0.02, step_s={"tiny": STEP_S}, output_tokens=16)
    await run_once(cfg, launcher, DevicePool("cpu", (0,), 1 << 28), items("tiny", 12), Recorder())
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({
        "custom_id": f"{m}-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": m, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}})
        + "\n" for i in range(8) for m in ("tiny", "small")))
    assert main(["plan", str(inp), "--config", str(conf), "--json", "--strategy", "samullm"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {(r["model"], r["tp"], r["threads"]): r for r in out["latency_sources"]}
    assert rows[("tiny", 1, 1)]["source"] == "online calibration"
    assert rows[("tiny", 1, 1)]["served"] == 12 and rows[("tiny", 1, 1)]["step_scale"] > 2
    assert rows[("tiny", 2, 1)]["source"] == "derived"  # from tiny TP 1
    assert rows[("small", 1, 1)]["detail"] == "from tiny at this shape"
    # nothing served at TP 2 nor of small: what every served shape says (tiny's TP 1), as
    # small's TP 1 has it, so the two compare as their bases do
    assert rows[("small", 2, 1)]["source"] == "derived"
    assert rows[("small", 2, 1)]["detail"] == "from every served shape: tiny TP1"
    assert rows[("small", 2, 1)]["step_scale"] == rows[("small", 1, 1)]["step_scale"]
    assert all(r["base"].startswith("roofline") for r in rows.values())
    # serve, restarted on the same state dir, predicts what plan predicted
    rec = Recorder()
    # engines that sleep when a stage replaces them, as the real launcher's on CPU
    ex = PoolExecutor(cfg, FakeLauncher(start_delay_s=5.0, freezable=True), planner=rec)
    await ex.start()
    try:
        ex.submit("input-0", [r.item for r in read_requests([str(inp)], cfg)], Sink())
        for _ in range(200):
            if rec.problems:
                break
            await asyncio.sleep(0.02)
        await ex.cancel("input-0")
    finally:
        await ex.close()
    assert plan(rec.problems[0], "samullm").makespan_s == pytest.approx(
        out["strategies"]["samullm"]["makespan_s"], rel=1e-9)
    assert main(["plan", str(inp), "--config", str(conf), "--strategy", "samullm"]) == 0
    text = capsys.readouterr().out
    assert "latency sources" in text and "online calibration of 12 served requests" in text


def test_a_shape_never_served_is_priced_with_caution_beside_one_that_was(tmp_path: Path) -> None:
    """A model that served at TP 1 has its TP 2 derived: that estimate is priced `caution` slower,
    so the planner leaves the shape it knows only for one predicted clearly faster (fresh bench,
    5 Dec: `sequential` moved small and tiny-a to a derived TP 2 and ran 34 % slower than with
    profiles). A model with nothing served, and a served shape itself, are priced as they are."""
    cfg = make_cfg(tmp_path)
    pool = DevicePool("cpu", (0, 1), 1 << 28)
    specs = {n: spec for n, spec in model_specs(cfg).items() if n in ("a", "b")}
    base = analytic_latency_model(specs["a"], 1, "cpu")
    fits = {("a", 1, 1, "cpu"): ShapeFit(2.0, 3.0, 40, 1, 10.0, 2.0, 10.0, "roofline",
                                         coefficients(base), 40)}
    plain = LatencySource.load(tmp_path, pool, ["a", "b"], {}, fits)
    careful = LatencySource.load(tmp_path, pool, ["a", "b"], {}, fits, caution=0.15)
    assert careful(specs["a"], 2).c1 == pytest.approx(plain(specs["a"], 2).c1 * 1.15)
    assert careful(specs["a"], 2).c0 == pytest.approx(plain(specs["a"], 2).c0 * 1.15)
    assert careful(specs["a"], 1) == plain(specs["a"], 1)  # served: as fitted
    assert careful(specs["b"], 2) == plain(specs["b"], 2)  # b served nothing: no other to prefer
    assert careful.source(specs["a"], 2)["caution"] == 0.15
    assert "caution" not in careful.source(specs["a"], 1)


def test_a_shape_never_served_pays_the_fresh_engine_cost_others_paid_at_it(tmp_path: Path) -> None:
    """A fresh engine is slow on its first requests, more so at TP 2 (2-3 s here): a shape neither
    served nor profiled is charged the most another model's engines paid at that shape, not
    nothing (fresh bench, 5 Dec: tiny-a's first TP 2 engine took 3.2 s for what one core did in
    0.8 s, priced as if warm)."""
    cfg = make_cfg(tmp_path)
    pool = DevicePool("cpu", (0, 1), 1 << 28)
    specs = {n: spec for n, spec in model_specs(cfg).items() if n in ("a", "b")}

    def fit(model: str, tp: int, first_s: float) -> ShapeFit:
        base = analytic_latency_model(specs[model], tp, "cpu")
        return ShapeFit(1.0, 1.0, 40, 1, 10.0, 2.0, 10.0, "roofline", coefficients(base), 40,
                        first_s=first_s)

    starts = {("a", 1, 1): 10.0, ("a", 2, 1): 10.0, ("b", 1, 1): 10.0, ("b", 2, 1): 10.0}
    fits = {("a", 1, 1, "cpu"): fit("a", 1, 0.5), ("b", 2, 1, "cpu"): fit("b", 2, 2.5)}
    src = LatencySource.load(tmp_path, pool, ["a", "b"], starts, fits)
    assert src(specs["a"], 2).load_time_s == pytest.approx(12.5)  # b's TP 2 engines' cost
    assert src(specs["a"], 1).load_time_s == pytest.approx(10.5)  # its own
    assert src(specs["b"], 1).load_time_s == pytest.approx(10.5)  # a's at TP 1
    alone = LatencySource.load(tmp_path, pool, ["a"], starts,
                               {("a", 1, 1, "cpu"): fits[("a", 1, 1, "cpu")]})
    # nobody served TP 2: a CPU engine's first requests at TP 2 cost what the profiles here paid
    assert alone(specs["a"], 2).load_time_s == pytest.approx(10.0 + DEFAULT_CPU_TP_COLD_S)


async def test_a_refit_replays_the_requests_each_engine_has_in_flight(tmp_path: Path) -> None:
    """Before a plan the executor refits with every engine's requests in flight: sent, not
    answered, each to its output cap (`scheduler.served.Pending`)."""
    cfg = make_cfg(tmp_path)
    save_start_times(cfg.state_dir, {("a", 1, 1): 0.02, ("b", 1, 1): 0.02})
    pool = DevicePool("cpu", (0, 1), int(cfg.devices.cpu_kvcache_gib * 2**30))
    launcher = FakeLauncher(start_delay_s=0.02, step_s={"a": 0.001, "b": 0.01}, output_tokens=8)
    ex = PoolExecutor(cfg, launcher, pool=pool, planner=Recorder())
    seen: list[dict] = []
    refit = ex.learned.calibrate

    async def spy(pool, specs, pending):
        seen.append({k: list(v) for k, v in pending.items()})
        await refit(pool, specs, pending)

    ex.learned.calibrate = spy  # type: ignore[method-assign]
    await ex.start()
    try:
        ex.submit("b", items("a", 2) + items("b", 40, start=3), Sink())
        await asyncio.wait_for(ex.wait("b"), 30)
    finally:
        await ex.close()
    # the re-plan when `a` finished: b's engine had its requests in flight (1.5 x 4 seats)
    flying = [v for s in seen for k, v in s.items() if k[0] == ("b", 1, 1, "cpu")]
    assert flying and all(0 < len(v) <= 6 for v in flying)
    assert all(p.max_tokens == 16 and p.prompt_tokens == 20 and p.queued_s <= p.sent_s
               for v in flying for p in v)
