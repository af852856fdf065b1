"""The eval harness and the pressure-transfer report, on the default model with a tiny grid."""

import csv
import dataclasses
import json
import re
import shutil

import pytest
import torch
from kvcompress.evals import harness as harness_module
from kvcompress.evals import reference_text
from kvcompress.evals.cases import CASES, render, score
from kvcompress.evals.cells import cell_keys
from kvcompress.evals.config import ReportConfig, Thresholds, configs_of
from kvcompress.evals.latency import latency_cells
from kvcompress.evals.records import RecordStore
from kvcompress.evals.render import COLUMNS
from kvcompress.evals.report import write_report
from kvcompress.evals.rows import Figures
from kvcompress.evals.run import run_report
from kvcompress.evals.stats import paired_recall
from kvcompress.evals.summary import _decode_change
from kvcompress.evals.sweep import load_sweep
from kvcompress.evals.tasks import TASKS, depths, make_case
from kvcompress.evals.verdicts import pressures

from kvcompress.strategy import parse_strategy

from .conftest import ROOT, head_commit, png_size


@pytest.mark.parametrize("task", [t for t in TASKS if not t.startswith("ruler_")])  # RULER's: test_ruler.py
def test_tasks_are_deterministic_and_plant_one_answer(default_model, task):
    _, tokenizer = default_model
    case = make_case(task, tokenizer, 400, 0.5, seed=3)
    assert case == make_case(task, tokenizer, 400, 0.5, seed=3)
    assert case.answer != make_case(task, tokenizer, 400, 0.5, seed=4).answer
    text = "".join(m["content"] for m in case.messages)
    assert text.count(case.answer) == 1
    context, question = render(tokenizer, case.messages, case.question)
    assert 360 <= len(context) + len(question) <= 400
    assert case.answer not in tokenizer.decode(question)


def test_needle_sits_at_its_depth(default_model):
    _, tokenizer = default_model
    for depth in (0.0, 0.5, 1.0):
        case = make_case("passkey", tokenizer, 600, depth)
        text = case.messages[0]["content"]
        where = text.index(case.answer) / text.index(case.question)
        assert abs(where - depth) < 0.15


def test_bad_task_inputs():
    with pytest.raises(ValueError, match="unknown task 'needle'; allowed: passkey, multikey, vartrack, multiturn"):
        make_case("needle", None, 100, 0.5)
    with pytest.raises(ValueError, match=r"depth must be within \[0, 1\]"):
        make_case("passkey", None, 100, 1.5)


def test_score_and_depths():
    assert score("12345", "The pass key is 12345.") and not score("12345", "It is 1234 5.")
    assert depths(5) == [0.0, 0.25, 0.5, 0.75, 1.0] and depths(1) == [0.5]


def _row(**overrides) -> Figures:
    """A row's figures: an int8 row that passes every guardrail, changed by `overrides`; the rest not measured."""
    row = {
        "strategy": "int8",
        "recall_loss_pts": 0.0,
        "recall_n": 10,
        "hbm_saved_pct": 47.0,
        "decode_change_pct": 5.0,
        "top1": 0.99,
        "kl": 1e-3,
        "host_bytes": 0,
        "disk_bytes": 0,
        "moved_bytes_per_step": None,
        "stall_ms_per_step": None,
        "overlap": None,
        "allocation_failures": 0,
    }
    return Figures(**{**dict.fromkeys(f.name for f in dataclasses.fields(Figures)), **row, **overrides})


def _paired(n: int, lost: int, won: int = 0) -> dict:
    """A row's recall figures from `n` paired cases: full right everywhere but where the candidate wins."""
    result = paired_recall([True] * (n - won) + [False] * won, [False] * lost + [True] * (n - lost))
    return {
        "recall_loss_pts": result.loss_pts,
        "recall_loss_interval": (result.low_pts, result.high_pts),
        "recall_n": n,
    }


def test_verdicts_are_judged_on_intervals():
    t, int8 = Thresholds(), parse_strategy("int8")
    one_in_twenty = pressures(_row(**_paired(20, 1)), int8, t).verdict
    assert one_in_twenty.startswith("inconclusive (n too small): recall loss 5.0 pts (95% CI")
    assert pressures(_row(**_paired(60, 15)), int8, t).verdict.startswith("fail: recall loss 25.0 pts (95% CI 6.7 to")
    assert pressures(_row(**_paired(240, 0)), int8, t).verdict == "pass"  # identical outcomes, n large enough
    assert pressures(_row(**_paired(60, 0)), int8, t).verdict.startswith("inconclusive")  # identical, n too small
    # top-1 over 256 predictions: 96.9% cannot be told from 98%, 90% can
    assert "inconclusive" in pressures(_row(top1=0.969, top1_interval=(0.939, 0.986)), int8, t).verdict
    assert pressures(_row(top1=0.90, top1_interval=(0.86, 0.93)), int8, t).verdict.startswith("fail: top-1 90.0%")
    latency = pressures(_row(decode_change_pct=20.0, decode_change_interval=(12.0, 30.0)), int8, t).verdict
    assert latency.startswith("inconclusive") and "decode +20% (95% CI +12 to +30) vs <= +15%" in latency


def test_guardrail_verdicts():
    t = Thresholds()
    int8, window = parse_strategy("int8"), parse_strategy("window:window=256")
    assert pressures(_row(), int8, t).verdict == "pass"
    assert pressures(_row(recall_loss_pts=2.5), int8, t).verdict == "fail: recall loss 2.5 pts vs <= 2.0 pts"
    assert "decode +20% vs <= +15%" in pressures(_row(decode_change_pct=20.0), int8, t).verdict
    assert "top-1 97.0% vs >= 98.0%" in pressures(_row(top1=0.97), int8, t).verdict
    assert "1 allocation failures" in pressures(_row(allocation_failures=1), int8, t).verdict
    assert pressures(_row(top1=None), int8, t).verdict == "incomplete: no top1"
    assert pressures(_row(recall_loss_pts=2.5), int8, Thresholds(recall_loss_pts=5)).verdict == "pass"
    words = pressures(_row(strategy="window:window=256", recall_loss_pts=40.0), window, t)
    assert words.relieved == "HBM -47.0% of KV"
    assert "older than the 256-token budget" in words.created and "-40.0 pts" in words.created
    assert "facts older than 256 tokens" in words.rollback
    assert pressures(_row(hbm_saved_pct=0.0), int8, t).verdict == "incomplete: cannot name relieved pressure"
    assert pressures(_row(strategy="full"), parse_strategy("full"), t).verdict == "baseline"
    disk = pressures(
        _row(
            strategy="full+disk",
            hbm_saved_pct=100.0,
            top1=1.0,
            host_bytes=2e7,
            disk_bytes=5e8,
            moved_bytes_per_step=1.2e7,
            stall_ms_per_step=3.0,
        ),
        parse_strategy("full+disk"),
        t,
    )
    assert disk.relieved == "HBM -100.0% of KV" and disk.verdict == "pass"
    assert disk.created == "decode latency +5%; host 0.020 GB + disk 0.500 GB holding KV; 12.0 MB moved per decode step"


TINY = dict(
    strategies=["full", "window:window=64", "full+disk"],
    tasks=["passkey"],
    lengths=[160],
    depths=2,
    seeds=1,
    decode_steps=4,
    latency_rounds=2,
    fidelity_windows=2,
    fidelity_prefill=64,
    fidelity_steps=8,
    max_new_tokens=8,
    kv_budget=None,  # capacity cells only where a test is about them (the every-column test, tests/test_capacity.py)
)


def _records(out):
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def test_report_writes_every_column_for_every_row(tmp_path):
    path = run_report(ReportConfig(**{**TINY, "kv_budget": "auto"}), tmp_path)  # the default's budget
    main, by_task = path.read_text().split("## Recall by task")
    table = [line for line in main.splitlines() if line.startswith("|")]
    columns = list(COLUMNS)
    columns.insert(columns.index("decode latency"), "at the KV budget")  # the default budget's capacity cells
    assert [c.strip() for c in table[0].strip("|").split("|")] == columns
    assert len(table) == 2 + 3
    assert [line.split("|")[1].strip() for line in by_task.splitlines() if line.startswith("|")] == [
        "strategy",
        "---",
        "`full`",
        "`window:window=64`",
        "`disk`",
    ]  # k/n on each task, where the loss comes from
    assert "| `full` | " in by_task and "/2 |" in by_task
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(columns) and all(cells)
        assert "n/a" not in line
    records = _records(tmp_path)
    assert records[0]["kind"] == "meta" and records[0]["command"] and records[0]["git_commit"] == head_commit()
    assert len(records) == 1 + 3 * 2 + 3 * 2 + 3 + 3  # latency: 2 rounds; capacity: 1
    full = [r for r in records[1:] if r["kind"] == "recall" and r["strategy"] == "full"]
    window = [r for r in records[1:] if r["kind"] == "recall" and r["strategy"] == "window:window=64"]
    assert all(r["stored_tokens"] == r["seen_tokens"] for r in full)
    assert all(r["stored_tokens"] == 64 for r in window)
    disk = [r for r in records[1:] if r["strategy"] == "disk"]  # the canonical form of full+disk
    assert all(
        r["kv_bytes_final"]["disk"] > 0 and not r["kv_bytes_final"].get("device") for r in disk if r["kind"] == "recall"
    )
    latency = next(r for r in disk if r["kind"] == "latency")
    assert latency["moved_bytes_per_step"] > 0 and 0 <= latency["overlap"] <= 1
    assert "MB/step moved" in table[-1] and "disk" in table[-1]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["strategy"] for r in summary["rows"]] == ["full", "window:window=64", "disk"]
    with (tmp_path / "summary.csv").open(newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["strategy"] for r in csv_rows] == [r["strategy"] for r in summary["rows"]]
    assert {r["git_commit"] for r in csv_rows} == {head_commit()}
    for name in ("pareto.png", "recall_heatmap.png", "latency_vs_context.png"):
        width, height = png_size(tmp_path / name)
        assert width >= 300 and height >= 200


def test_the_committed_default_run_summarises_to_its_committed_summary(tmp_path):
    """Rows are typed (ReportRow) and serialise as the committed files hold them: results/default's records, reported
    again, give its summary.json and summary.csv to the byte."""
    committed = ROOT / "results" / "default"
    shutil.copy(committed / "records.jsonl", tmp_path)
    write_report(tmp_path)
    for name in ("summary.json", "summary.csv"):
        assert (tmp_path / name).read_text() == (committed / name).read_text(), name


def test_question_placements_needle_survival_and_peak_are_recorded(tmp_path):
    config = ReportConfig(
        **{
            **TINY,
            "strategies": ["full", "window:window=64", "snapkv:budget=64,window=16,when=budget"],
            "questions": ["after", "inside"],
        }
    )
    path = run_report(config, tmp_path)
    recall = [r for r in _records(tmp_path)[1:] if r["kind"] == "recall"]
    assert sorted({r["question"] for r in recall}) == ["after", "inside"] and len(recall) == 2 * 2 * 3
    for r in recall:
        layers = r["needle_survival_per_layer_head"]
        assert len(layers) == 30 and all(len(heads) == 3 for heads in layers)
        assert r["peak_kv_bytes"] >= sum(r["kv_bytes_final"].values()) > 0
        if r["strategy"] == "full":
            assert r["needle_survival"] == 1.0
        else:  # 64 of ~150 tokens kept: the window loses the needle at depth 0; snapkv keeps part of it somewhere
            assert r["needle_survival"] < 1.0 or r["depth"] == 1.0
    snapkv = [r for r in recall if r["strategy"].startswith("snapkv")]
    assert all(r["stored_tokens"] == 64 for r in snapkv)
    by_head = {tuple(map(tuple, r["needle_survival_per_layer_head"])) for r in snapkv}
    assert len(by_head) > 1  # heads and layers keep different tokens
    table = [line for line in path.read_text().split("## Recall by task")[0].splitlines() if line.startswith("| `")]
    assert len(table) == 3 * 2 and "[question inside]" in table[-1] and "needle kept" in table[-1]


def test_random_weights_give_memory_and_latency_rows_and_say_why_recall_is_skipped(tmp_path):
    config = ReportConfig(**{**TINY, "model": "random:tiny", "strategies": ["full", "int8", "window:window=64"]})
    path = run_report(config, tmp_path)
    records = _records(tmp_path)[1:]
    skipped = [r for r in records if r["outcome"] == "skipped"]
    assert {r["kind"] for r in skipped} == {"recall", "fidelity"} and "random weights" in skipped[0]["reason"]
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    window = next(r for r in rows if r["strategy"] == "window:window=64")
    assert window["hbm_saved_pct"] > 50 and window["decode_ms_p50"] > 0 and window["recall_n"] == 0
    assert "memory and latency only: random:tiny has random weights" in path.read_text()
    assert all(r["compiled"] is None for r in records if r["kind"] == "latency")


def test_compiled_latency_cells_have_ids_of_their_own():
    config = ReportConfig(**{**TINY, "strategies": ["full", "int8"]})
    compiled = ReportConfig(**{**vars(config), "compile": True})
    ids = {
        kind: [{c["id"] for c in cell_keys(c) if c["kind"] == kind} for c in (config, compiled)]
        for kind in ("latency", "recall")
    }
    assert ids["latency"][0].isdisjoint(ids["latency"][1])  # a resume never mixes compiled and eager timings
    assert ids["recall"][0] == ids["recall"][1]


def test_latency_rounds_are_cells_of_their_own_and_round_zero_keeps_its_id():
    one = ReportConfig(**{**TINY, "latency_rounds": 1})
    three = ReportConfig(**{**TINY, "latency_rounds": 3})
    latency = [[c for c in cell_keys(config) if c["kind"] == "latency"] for config in (one, three)]
    assert len({c["id"] for c in latency[1]}) == 3 * len(latency[0])
    assert {c["id"] for c in latency[0]} < {c["id"] for c in latency[1]}  # a run from before rounds resumes
    assert [c.get("round", 0) for c in latency[1]] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # interleaved
    with pytest.raises(ValueError, match="latency_rounds must be positive"):
        ReportConfig(**{**TINY, "latency_rounds": 0})


def test_the_decode_interval_resamples_rounds_not_steps():
    """The steps of one pass agree closely while passes differ (the machine's minute): the interval must carry the
    spread between rounds, not the far narrower one between steps of a pass."""

    def cell(strategy, round, ms):
        steps = [ms + 0.01 * i for i in range(24)]
        return {
            "kind": "latency",
            "outcome": "ok",
            "strategy": strategy,
            "length": 512,
            "round": round,
            "decode_ms": steps,
            "decode_ms_p50": sorted(steps)[12],
            "ttft_s": 1.0,
        }

    records = [cell("full", r, 10.0) for r in range(3)] + [
        cell("int8", r, ms) for r, ms in enumerate([10.5, 11.5, 12.5])
    ]
    cells = latency_cells(records)
    change, low, high = _decode_change(cells[("int8", 512)], cells[("full", 512)])
    assert low < 6 and high > 24 and low < change < high  # rounds at +5 %, +15 %, +25 %
    first = latency_cells([records[0], records[3]])
    _, low1, high1 = _decode_change(first[("int8", 512)], first[("full", 512)])
    assert high1 - low1 < 2 < (high - low) / 5  # one round: its steps' bootstrap, as narrow as they are alike
    assert cells[("int8", 512)]["decode_ms_p50"] == pytest.approx(11.5 + 0.115, abs=0.01)


def test_interrupted_run_resumes_without_redoing_anything(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = harness_module.Harness.recall

    def interrupted(self, **cell):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, **cell)

    monkeypatch.setattr(harness_module.Harness, "recall", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_report(ReportConfig(**TINY), tmp_path)
    kept = _records(tmp_path)
    assert len(kept) == 1 + 2
    with pytest.raises(FileExistsError, match="already holds records"):
        run_report(ReportConfig(**TINY), tmp_path)

    monkeypatch.setattr(harness_module.Harness, "recall", original)
    done = []
    monkeypatch.setattr(
        RecordStore, "append", lambda self, r, _orig=RecordStore.append: (done.append(r), _orig(self, r))
    )
    run_report(None, tmp_path, resume=True)
    records = _records(tmp_path)
    assert records[:3] == kept
    assert len(records) == 1 + 3 * 2 + 3 * 2 + 3 and len(done) == len(records) - 3
    keys = [RecordStore.key(r) for r in records[1:]]
    assert len(keys) == len(set(keys))


def test_allocation_failure_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    original = harness_module.Harness.latency

    def out_of_memory(self, strategy, length):
        if strategy != "full":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self, strategy, length)

    monkeypatch.setattr(harness_module.Harness, "latency", out_of_memory)
    path = run_report(ReportConfig(**{**TINY, "strategies": ["full", "window:window=64"]}), tmp_path)
    failed = [r for r in _records(tmp_path) if r.get("outcome") == "allocation_failure"]
    assert len(failed) == 2 and all(r["kind"] == "latency" and "20.00 GiB" in r["error"] for r in failed)  # 2 rounds
    assert "incomplete: no decode_change_pct" in path.read_text()


def test_corrupt_or_foreign_records_are_refused(tmp_path):
    (tmp_path / "records.jsonl").write_text('{"kind": "meta", "format": "kvcompress-records/1"}\nnot json\n{}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        RecordStore(tmp_path / "records.jsonl")
    (tmp_path / "records.jsonl").write_text('{"results": []}\n')
    with pytest.raises(ValueError, match="not a kvcompress records file"):
        RecordStore(tmp_path / "records.jsonl")
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        RecordStore(tmp_path / "missing.jsonl")


def test_torn_last_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"kind": "meta", "format": "kvcompress-records/1"}\n{"kind": "latency", "strat')
    store = RecordStore(path)
    assert store.records == [] and path.read_text().endswith("}\n")


def test_bad_report_settings():
    with pytest.raises(ValueError, match="unknown strategy part 'int9'"):
        ReportConfig(strategies=["int9"])
    with pytest.raises(ValueError, match="unknown task\\(s\\) needle; allowed: passkey, multikey"):
        ReportConfig(tasks=["passkey", "needle"])
    with pytest.raises(ValueError, match="depths must be positive"):
        ReportConfig(depths=0)
    with pytest.raises(ValueError, match="unknown report setting"):
        ReportConfig.from_dict({"lenghts": [1]})
    with pytest.raises(ValueError, match="fidelity_text must be a readable text file"):
        ReportConfig(fidelity_text="/nonexistent.txt")
    with pytest.raises(ValueError, match="compile must be true or false, got 'yes'"):
        ReportConfig(compile="yes")
    with pytest.raises(ValueError, match="questions must list placements among after, inside"):
        ReportConfig(questions=["before"])
    with pytest.raises(ValueError, match="prefill_chunk must be a positive"):
        ReportConfig(prefill_chunk=0)
    with pytest.raises(ValueError, match="recall_batch must be positive, got 0"):
        ReportConfig(recall_batch=0)


def test_sweeps_expand_their_grids(tmp_path):
    (config,), out = load_sweep("experiments/sweep_retention.yaml")
    assert config.strategies == [
        "full",
        "window:window=128",
        "window:window=256",
        "window:window=512",
        "sink:sinks=1,window=252",
        "sink:window=252",
        "sink:sinks=16,window=252",
    ]
    assert str(out) == "results/sweeps/retention"
    (config,), _ = load_sweep("experiments/sweep_int8.yaml")
    assert len(config.strategies) == 1 + 9
    bad = tmp_path / "bad.yaml"
    bad.write_text("sweep:\n  - template: 'window:window={w}'\n    grid: {size: [1]}\n")
    with pytest.raises(ValueError, match="template uses 'w' but its grid has no such key"):
        load_sweep(bad)


def test_sweep_files_vary_any_axis_over_several_models(tmp_path):
    sweep = tmp_path / "axes.yaml"
    sweep.write_text(
        "models: [default, random:tiny]\nstrategies: [int8, 'sink+int8', fp8]\n"
        "grid: {sink.window: [128, 256], int8.group: [0, 32]}\n"
        "sweep:\n  - template: 'window:window={w}'\n    grid: {w: [64]}\n"
    )
    configs, out = load_sweep(sweep)
    assert [c.model for c in configs] == ["default", "random:tiny"] and str(out) == "results/sweeps/axes"
    assert (
        configs[0].strategies
        == configs[1].strategies
        == [
            "full",
            "int8",
            "int8:group=32",
            "sink:window=128+int8",
            "sink:window=128+int8:group=32",
            "sink:window=256+int8",
            "sink:window=256+int8:group=32",
            "fp8",
            "window:window=64",
        ]
    )  # group=0 is int8's default
    for text, message in [
        ("strategies: [int8]\ngrid: {int8.size: [1]}", "int8 has no parameter 'size'; allowed: "),
        ("strategies: [int8]\ngrid: {window: [1]}", "must be <member>.<parameter>"),
        ("strategies: [int8]\ngrid: {sink.window: [1]}", "sink.window vary none of the strategies"),
        ("grid: {sink.window: [1]}", "'grid' varies the listed 'strategies'"),
        ("models: [default, default]\nstrategies: [int8]", "lists a model twice"),
        ("strategies: [int8]\nmodel: default", "unknown top-level key"),
    ]:
        sweep.write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            load_sweep(sweep)


def test_fidelity_text_from_a_file(tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("Call me Ishmael. Some years ago, never mind how long precisely, I went to sea. " * 5)
    harness = harness_module.Harness(ReportConfig(**TINY, fidelity_text=str(text)))
    ids = harness._text_ids(12)
    assert ids.shape == (1, 12) and harness.tokenizer.decode(ids[0]).startswith("Call me Ishmael")


def test_a_run_over_two_models_reports_each_in_its_own_section(tmp_path):
    configs = [
        ReportConfig(**{**TINY, "model": model, "strategies": ["full", "window:window=64"]})
        for model in ("random:tiny", "default")
    ]
    path = run_report(configs, tmp_path)
    records = _records(tmp_path)[1:]
    assert {r["model"] for r in records} == {"random:tiny", "default"}
    assert sorted(r["id"] for r in records) == sorted(c["id"] for config in configs for c in cell_keys(config))
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert [(r["model"], r["strategy"]) for r in rows] == [
        (m, s) for m in ("random:tiny", "default") for s in ("full", "window:window=64")
    ]
    tiny_window, default_window = rows[1], rows[3]
    assert tiny_window["recall_n"] == 0 and default_window["recall_n"] == 2  # each model's own cells, none mixed
    text = path.read_text()
    assert text.index("## random:tiny") < text.index("## default")
    assert min(png_size(tmp_path / "default" / "pareto.png")) >= 200


def test_resuming_a_finished_run_loads_no_model(tmp_path, monkeypatch):
    run_report(ReportConfig(**{**TINY, "model": "random:tiny", "strategies": ["full"]}), tmp_path)
    before = (tmp_path / "records.jsonl").read_text()

    def no_model(self, config):
        raise AssertionError("a finished run loaded a model")

    monkeypatch.setattr(harness_module.Harness, "__init__", no_model)
    path = run_report(None, tmp_path, resume=True)
    assert (tmp_path / "records.jsonl").read_text() == before and "| `full` |" in path.read_text()


def test_records_of_earlier_case_generators_are_never_mixed_with_new_cases(tmp_path):
    config = {**TINY, "strategies": ["full"]}
    run_report(ReportConfig(**config), tmp_path)
    records = _records(tmp_path)
    meta = records[0]
    for c in [meta["config"], *meta["configs"]]:  # as a file written before the generators' version was recorded
        del c["cases"]
    recall = [r for r in records[1:] if r["kind"] == "recall"]
    assert recall and all(159 <= r["prompt_tokens"] <= 160 for r in recall)  # since version 2: within a token
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [meta, *records[1:]]))
    with pytest.raises(
        ValueError, match=f"made by version 1 of the case generators and this kvcompress makes version {CASES}"
    ):
        run_report(None, tmp_path, resume=True)  # their ids are version 1's: every recall cell looks missing
    assert _records(tmp_path)[1:] == records[1:]
    run_report(ReportConfig(**config), tmp_path, resume=True)  # the grid given again: this version's ids, all done
    assert _records(tmp_path)[1:] == records[1:]


BATCHED = ["sink:sinks=4,window=60+int8", "knorm:budget=64,window=16", "snapkv:budget=64,window=16,when=budget"]


def test_batched_recall_equals_one_case_at_a_time():
    """Left-padded batches give each case the record it gets alone: output, outcome, needle survival per head and
    (up to the padding) bytes, for positional, score-based (replayed with and without attention) and encoded
    strategies, with the question after the context and inside the prompt."""
    grid = dict(
        strategies=BATCHED,
        tasks=["multikey"],
        lengths=[160],
        depths=2,
        seeds=2,  # questions of 2 lengths
        questions=["after", "inside"],
        compute_dtype="float32",
        kv_dtype="float32",
        max_new_tokens=6,
    )
    cells = [c for c in cell_keys(ReportConfig(**grid)) if c["kind"] == "recall"]
    args = lambda c: {k: c[k] for k in ("strategy", "task", "length", "depth", "seed", "question")}  # noqa: E731
    alone = harness_module.Harness(ReportConfig(**grid, recall_batch=1))
    expected = [alone.recall(**args(c)) for c in cells]
    batched = harness_module.Harness(ReportConfig(**grid, recall_batch=4))
    got = [batched.recall(**args(c)) for c in cells]
    assert not batched._recalled  # every batch-mate's record was handed to its own cell
    assert {r["batch_rows"] for r in expected} == {1}
    rows = {q: sorted({r["batch_rows"] for c, r in zip(cells, got) if c["question"] == q}) for q in ("after", "inside")}
    assert rows == {"after": [4], "inside": [4]}  # every key is one token: the questions are alike, one batch each
    for cell, one, many in zip(cells, expected, got):
        assert (many["output"], many["correct"], many["prompt_tokens"]) == (
            one["output"],
            one["correct"],
            one["prompt_tokens"],
        ), cell
        assert many["needle_survival_per_layer_head"] == one["needle_survival_per_layer_head"], cell
        padding = many["seen_tokens"] - one["seen_tokens"]  # the batch's longest row sets the width
        per_token = one["kv_bytes_final"]["device"] / one["stored_tokens"]
        assert 0 <= many["kv_bytes_final"]["device"] - one["kv_bytes_final"]["device"] <= padding * per_token + 64


def test_the_shipped_fidelity_text_gives_disjoint_windows(default_model):
    """The default fidelity windows never repeat a token of the novel: every prediction on a different
    position, which the top-1 interval assumes."""
    _, tokenizer = default_model
    tokens = len(tokenizer(reference_text())["input_ids"])
    c = ReportConfig()
    assert tokens > 90_000 and tokens // c.fidelity_windows >= c.fidelity_prefill + c.fidelity_steps


def test_records_from_before_latency_lengths_keep_latency_at_every_length():
    """A records file whose config has no latency_lengths timed latency at each of its lengths: resumed or reported,
    its grid still holds those cells; a file that names them keeps its own."""
    old = {"config": {"model": "random:tiny", "lengths": [64, 96]}}
    (config,) = configs_of(old)
    assert config.latency_lengths == [64, 96]
    assert sorted({c["length"] for c in cell_keys(config) if c["kind"] == "latency"}) == [64, 96]
    (config,) = configs_of({"config": {**old["config"], "latency_lengths": [96]}})
    assert config.latency_lengths == [96] and ReportConfig(lengths=[64, 96]).latency_lengths == [96]


def test_the_wide_set_is_the_quick_grid_and_the_members_it_leaves_out():
    """`--strategies wide` is one flag away from the default grid: every quick strategy, then the rest, once each."""
    quick, wide = ReportConfig().strategies, ReportConfig(strategies=["wide"]).strategies
    assert wide[: len(quick)] == quick and len(set(wide)) == len(wide)
    assert {"int4", "fp8", "window:window=256", "kvzip:budget=256", "disk"} == set(wide) - set(quick)
    assert ReportConfig(strategies=["quick", "fp8"]).strategies == [*quick, "fp8"]
