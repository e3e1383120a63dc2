"""`samullm plan` end to end through the real CLI parser: CPU config with demo-sized models, and the
shipped plan-only paper config on 8 A100s (no weights on this machine)."""

from __future__ import annotations

import asyncio
import json

import pytest

from cli.main import main

CPU_CONF = """
[server]
state_dir = "{state}"
[devices]
kind = "cpu"
ids = [0, 1, 2, 3]
cpu_kvcache_gib = 0.25
[scheduler]
samples = 2
{models}
"""
MODEL = """
[[models]]
name = "{name}"
max_model_len = 1024
max_num_seqs = 16
max_num_batched_tokens = 1024
arch = {{ num_layers = {layers}, hidden_size = {hidden}, num_heads = 4, num_kv_heads = 2, intermediate_size = {inter}, vocab_size = 2048 }}
"""


def _line(i: int, model: str, text: str, max_tokens: int | None = 64, url="/v1/chat/completions"):
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return json.dumps({"custom_id": f"{model}-{i}", "method": "POST", "url": url, "body": body})


@pytest.fixture()
def cpu_setup(tmp_path):
    models = "".join(MODEL.format(name=n, layers=l, hidden=h, inter=4 * h)
                     for n, l, h in (("tiny", 2, 128), ("small", 4, 256), ("medium", 8, 512)))
    conf = tmp_path / "c.toml"
    conf.write_text(CPU_CONF.format(state=tmp_path / "state", models=models))
    inp = tmp_path / "in.jsonl"
    lines = [_line(i, m, "word " * (10 + 7 * i), 32 + i) for i in range(30)
             for m in ("tiny", "small", "medium")]
    inp.write_text("\n".join(lines) + "\n")
    return conf, inp


def test_plan_json_has_every_strategy_and_consistent_speedups(cpu_setup, capsys):
    conf, inp = cpu_setup
    assert main(["plan", str(inp), "--config", str(conf), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["strategies"]) == {"samullm", "sequential", "even-split", "per-model-best",
                                      "muxserve-greedy", "level-by-level"}
    assert out["requests"] == 90 and out["planning_time_s"] > 0
    ref = out["strategies"]["samullm"]["makespan_s"]
    for name, s in out["strategies"].items():
        assert s["makespan_s"] >= ref * (1 - 1e-9)
        assert s["samples"]["samples"] == 2 and s["samples"]["min_s"] <= s["samples"]["max_s"]
        assert s["stages"][-1]["end_s"] == pytest.approx(s["makespan_s"], abs=1e-3)
        used = [d for st in s["stages"] for p in st["plans"] for d in p["devices"]]
        assert set(used) <= {0, 1, 2, 3}
        if name != "samullm":
            assert out["speedup_of_samullm"][name] == pytest.approx(s["makespan_s"] / ref)
    done = sorted(m for st in out["strategies"]["samullm"]["stages"] for m in st["finished"])
    assert done == ["medium", "small", "tiny"]


def test_plan_text_table_and_gantt_svg(cpu_setup, capsys, tmp_path):
    conf, inp = cpu_setup
    svg = tmp_path / "g.svg"
    rc = main(["plan", str(inp), "--config", str(conf), "--devices", "cpu:2", "--samples", "1",
               "--gantt", str(svg)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "samullm speedup" in text and "stage 1:" in text and "2x cpu" in text
    bound = [line for line in text.splitlines() if line.startswith("lower bound ")]
    assert len(bound) == 1 and bound[0].endswith(" s")
    assert 0 < float(bound[0].split()[2].replace(",", "")) <= min(
        float(line.split()[1].rstrip("s").replace(",", "")) for line in text.splitlines()
        if line.split()[:1] and line.split()[0] in ("samullm", "sequential"))
    assert svg.read_text().lstrip().startswith(("<?xml", "<svg")) and "TP1" in svg.read_text()


def test_plan_single_strategy_and_unknown_model(cpu_setup, capsys, tmp_path):
    conf, inp = cpu_setup
    assert main(["plan", str(inp), "--config", str(conf), "--strategy", "sequential", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["strategies"]) == ["sequential"] and "speedup_of_samullm" not in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_line(0, "nope", "hi") + "\n")
    assert main(["plan", str(bad), "--config", str(conf)]) == 2
    assert "nope" in capsys.readouterr().err


def test_paper_config_plans_on_a100s_without_weights(tmp_path, capsys):
    inp = tmp_path / "p.jsonl"
    lines = [_line(i, m, "tell me about " + "things " * (i % 40), 256) for i in range(40)
             for m in ("Llama-2-70b-chat", "Mistral-7B-Instruct", "vicuna-13b-v1.5")]
    inp.write_text("\n".join(lines) + "\n")
    png = tmp_path / "g.png"
    rc = main(["plan", str(inp), "--config", "conf/paper-a100.toml", "--json", "--samples", "2",
               "--gantt", str(png)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for s in out["strategies"].values():
        for st in s["stages"]:
            for p in st["plans"]:
                if p["model"] == "Llama-2-70b-chat":
                    assert p["tp"] >= 2  # 138 GB of fp16 weights do not fit one 80 GB A100
                for r in range(p["dp"]):  # TP groups stay inside an NVLink pair
                    devs = p["devices"][r * p["tp"]:(r + 1) * p["tp"]]
                    assert len({d // 2 for d in devs}) == 1
    # 4 GPUs give a longer plan than 8
    assert main(["plan", str(inp), "--config", "conf/paper-a100.toml", "--json", "--samples", "1",
                 "--devices", "a100x4-nvlink-pairs", "--strategy", "samullm"]) == 0
    four = json.loads(capsys.readouterr().out)["strategies"]["samullm"]["makespan_s"]
    assert four > out["strategies"]["samullm"]["makespan_s"]


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("dag", [False, True], ids=["independent", "judge"])
async def test_plan_predicts_what_serve_plans(tmp_path, capsys, dag):
    """`samullm plan` and the `plan` event of a batch submitted to an idle gateway predict the same
    makespan for the same input file, config and state dir (the house issue), also for a file of
    dependent requests (small grades each of tiny's answers)."""
    from runtime.config import load_config
    from runtime.executor.executor import PoolExecutor
    from tests.gateway.conftest import poll, running
    from tests.runtime.fakes import FakeLauncher

    models = "".join(MODEL.format(name=n, layers=l, hidden=h, inter=4 * h)
                     + f'path = "/nonexistent/{n}"\n'
                     for n, l, h in (("tiny", 2, 128), ("small", 4, 256)))
    conf = tmp_path / "c.toml"
    conf.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n[devices]\nkind = "cpu"\n'
                    f'cpu_kvcache_gib = 0.25\nspare_engines = 0\n{models}')
    inp = tmp_path / "in.jsonl"
    lines = [_line(i, m, "word " * (5 + 3 * i), 16 + i) for i in range(20)
             for m in ("tiny", "small")]
    if dag:
        lines += [_dep_line(f"grade-{i}", "small", f"Grade: {{{{tiny-{i}}}}}", [f"tiny-{i}"])
                  for i in range(20)]
    inp.write_text("\n".join(lines) + "\n")
    assert main(["plan", str(inp), "--config", str(conf), "--json", "--strategy", "samullm"]) == 0
    offline = json.loads(capsys.readouterr().out)
    predicted = offline["strategies"]["samullm"]["makespan_s"]
    cfg = load_config(str(conf))
    ex = PoolExecutor(cfg, FakeLauncher(start_delay_s=5.0))
    async with running(cfg, ex) as srv:
        client = srv.client()
        f = await client.files.create(file=("in.jsonl", inp.read_bytes()), purpose="batch")
        b = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
        await poll(client, b.id, lambda x: x.status == "in_progress")
        for _ in range(200):
            plans = [e for e in ex.events(b.id) if e["event"] == "plan"]
            if plans:
                break
            await asyncio.sleep(0.02)
        await client.batches.cancel(b.id)
    assert plans and plans[0]["predicted_makespan_s"] == pytest.approx(predicted, rel=1e-9)
    # the same lower bound, below the prediction
    assert plans[0]["lower_bound_s"] == pytest.approx(offline["lower_bound_s"], rel=1e-9)
    assert 0 < plans[0]["lower_bound_s"] <= predicted


def _dep_line(cid: str, model: str, text: str, deps: list[str], max_tokens: int = 16) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "depends_on": deps, "body": {"model": model, "max_tokens": max_tokens,
                                                    "messages": [{"role": "user", "content": text}]}})


def test_plan_accepts_dependent_requests_and_no_model_ends_before_its_upstream(cpu_setup, capsys,
                                                                             tmp_path):
    """An evaluation sweep with a judge in one file: tiny and small answer, medium grades each
    answer. Every strategy (level-by-level too) plans it; the judge never finishes before the
    models it waits for."""
    conf, _ = cpu_setup
    inp = tmp_path / "judge.jsonl"
    lines = [_line(i, m, "word " * (10 + 3 * i), 48) for i in range(20) for m in ("tiny", "small")]
    lines += [_dep_line(f"judge-{m}-{i}", "medium", f"Answer: {{{{{m}-{i}}}}}\nGrade:", [f"{m}-{i}"])
              for i in range(20) for m in ("tiny", "small")]
    inp.write_text("\n".join(lines) + "\n")
    svg = tmp_path / "g.svg"
    assert main(["plan", str(inp), "--config", str(conf), "--json", "--gantt", str(svg)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "level-by-level" in out["strategies"] and out["requests"] == 80
    ref = out["strategies"]["samullm"]["makespan_s"]
    for name, s in out["strategies"].items():
        assert s["makespan_s"] >= ref * (1 - 1e-9), name
        ends = {m: st["end_s"] for st in s["stages"] for m in st["finished"]}
        assert set(ends) == {"tiny", "small", "medium"}, name
        assert ends["medium"] >= max(ends["tiny"], ends["small"]) - 1e-9, name
    assert svg.read_text().lstrip().startswith(("<?xml", "<svg"))


def test_plan_predicts_each_input_files_completion(cpu_setup, capsys, tmp_path):
    """Two files, two batches of one pool: per strategy, each file's requests and predicted
    completion (its last request's finish); the file that ends last ends at the makespan."""
    conf, inp = cpu_setup
    quick = tmp_path / "quick.jsonl"
    quick.write_text("\n".join(_line(i, "tiny", "word " * 5, 4) for i in range(6)) + "\n")
    assert main(["plan", str(quick), str(inp), "--config", str(conf), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["requests"] == 96
    for name, s in out["strategies"].items():
        rows = s["inputs"]
        assert [(r["file"], r["requests"]) for r in rows] == [(str(quick), 6), (str(inp), 90)]
        done = [r["predicted_completion_s"] for r in rows]
        assert all(0 < d <= s["makespan_s"] + 5e-4 for d in done), name
        assert max(done) == pytest.approx(s["makespan_s"], abs=1e-3), name
    sam = out["strategies"]["samullm"]["inputs"]
    # six 4-token answers of the smallest model are done before 90 answers of all three models
    assert sam[0]["predicted_completion_s"] < sam[1]["predicted_completion_s"]
    assert sam[1]["predicted_completion_s"] == pytest.approx(
        out["strategies"]["samullm"]["makespan_s"], abs=1e-3)
    # the text output: one row per file, for the chosen strategy
    assert main(["plan", str(quick), str(inp), "--config", str(conf), "--strategy", "sequential",
                 "--samples", "1"]) == 0
    text = capsys.readouterr().out
    assert "predicted completion per input file (sequential):" in text
    rows = [ln.split() for ln in text.splitlines() if ln.strip().startswith(str(tmp_path))]
    assert [(r[0], int(r[1])) for r in rows] == [(str(quick), 6), (str(inp), 90)]
    assert "samullm speedup" in text and "stage 1:" in text


def test_a_fresh_two_core_gateway_puts_the_demo_medium_on_both_cores_without_tp(tmp_path, capsys):
    """No profile, nothing served: the demo medium on the two cores of this machine runs faster
    without TP 2 (profiles of 4 Dec: TP 2 ~ the same per step as one rank on both cores, plus 2.2 s
    of first requests). The roofline's threads speed-up and a TP-2 engine's fresh cost say so;
    without them `sequential` put every model at TP 2 and ran 5-20 % slower (`bench/fresh.py`).
    Two one-core replicas, not one rank on both: those start in ~3 s, a rank on several cores
    in ~15 s (`runtime.engines.api_server`)."""
    models = "".join(MODEL.format(name=n, layers=l, hidden=h, inter=4 * h).replace(
        "num_heads = 4, num_kv_heads = 2", f"num_heads = {heads}, num_kv_heads = {kv}")
        for n, l, h, heads, kv in (("tiny-a", 2, 128, 2, 1), ("small", 4, 256, 4, 2),
                                   ("medium", 8, 512, 8, 2)))
    conf = tmp_path / "c.toml"
    conf.write_text(CPU_CONF.format(state=tmp_path / "state", models=models)
                    .replace("ids = [0, 1, 2, 3]", "ids = [0, 1]"))
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(_line(i, m, "word " * (40 + 3 * i), 96) for m, n in
                             (("tiny-a", 64), ("small", 64), ("medium", 32)) for i in range(n)))
    assert main(["plan", str(inp), "--config", str(conf), "--strategy", "sequential",
                 "--json"]) == 0
    stages = json.loads(capsys.readouterr().out)["strategies"]["sequential"]["stages"]
    shapes = {p["model"]: (p["tp"], p["dp"], p.get("threads", 1))
              for st in stages for p in st["plans"]}
    assert shapes["medium"] == (1, 2, 1)
    assert all(tp == 1 for tp, _, _ in shapes.values())
