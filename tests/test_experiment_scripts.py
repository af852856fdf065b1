"""Benchmark scripts under experiments/, run on CPU with a tiny random model: the GPU check must not be what fails
on a lent GPU (minutes of it), and a benchmark's verdicts must come from its intervals."""

import gc
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvcompress import bytes_per_token, load_model, parse_strategy
from kvcompress.provenance import provenance

REPO = Path(__file__).resolve().parent.parent


def _run(script: str, argv: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [script, *argv])
    try:
        runpy.run_path(str(REPO / "experiments" / script), run_name="__main__")
    finally:
        gc.unfreeze()  # a script may freeze what it holds for its own run; this process goes on


def test_decode_check_runs_every_cell_and_judges_the_targets_at_its_largest_cell(tmp_path, monkeypatch):
    strategies = (
        "HF DynamicCache,full,full grow,int8,int8 decoded,fp8,int4,int4 decoded,sink:sinks=4,window=2044,full+host"
    )
    _run(
        "gpu/decode_check.py",
        [
            "--device",
            "cpu",
            "--model",
            "random:tiny",
            "--contexts",
            "32,48",
            "--batches",
            "1,2",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--strategies",
            strategies,
            "--out",
            str(tmp_path),
        ],
        monkeypatch,
    )
    result = json.loads((tmp_path / "decode.json").read_text())
    assert result["correctness"] and all(r.get("same_tokens") and r["fused_ran"] for r in result["correctness"])
    rows = result["rows"]
    assert len(rows) == 10 * 2 * 2 and not [r for r in rows if "decode_ms_p50" not in r]  # no cell failed
    assert all(r["kv_device_bytes"] > 0 for r in rows if r["strategy"] != "full+host")
    targets = {t["strategy"]: t for t in result["targets"]}
    ms = {(r["strategy"], r["context"], r["batch"]): r["decode_ms_p50"] for r in rows}
    for strategy in ("int8", "fp8", "int4"):  # judged at 48 tokens, batch 2: the run's largest cell
        target = targets[strategy]
        assert (target["context"], target["batch"]) == (48, 2)
        # the ratio is the two rows' own medians, and the verdict is that ratio against the target's limit
        ratio = ms[strategy, 48, 2] / ms[target["over"], 48, 2]
        assert target["ratio"] == round(ratio, 3) and target["met"] == (ratio <= target["limit"])
    assert targets["full compiled"]["met"] is None  # not in this run: said so, not judged
    text = (tmp_path / "decode.md").read_text()
    assert "## Targets" in text and "| int8 | full | 48 | 2 |" in text
    assert result["meta"]["command"].startswith("bash experiments/gpu/decode_check.sh")


def test_bench_core_judges_each_target_by_its_interval(tmp_path, monkeypatch):
    _run(
        "bench_core.py",
        [
            "--model",
            "random:tiny",
            "--lengths",
            "48",
            "--steps",
            "12",
            "--warmup",
            "2",
            "--rounds",
            "2",
            "--strategies",
            "full,int8,fp8",
            "--out",
            str(tmp_path),
        ],
        monkeypatch,
    )
    result = json.loads((tmp_path / "bench_core.json").read_text())
    rows = {r["strategy"]: r for r in result["rows"]}
    assert all([len(steps) for steps in r["decode_ms_rounds"]] == [10, 10] for r in rows.values())  # what is judged
    assert [(t["strategy"], t["reference"]) for t in result["targets"]] == [
        ("full", "DynamicCache"),
        ("int8", "full"),
        ("fp8", "full"),
    ]
    for t in result["targets"]:
        low, high = t["interval"]
        assert t["met"] == ("yes" if high <= t["limit"] else "no" if low > t["limit"] else "inconclusive")
    assert rows["int8"]["aten_ops_per_step"] > rows["full"]["aten_ops_per_step"] > 0  # encode + decode, every layer
    assert "| 48 | int8 | full | 1.10x |" in (tmp_path / "bench_core.md").read_text()


def test_bench_core_pools_processes_and_keeps_finished_ones(tmp_path, monkeypatch):
    argv = [
        "--model",
        "random:tiny",
        "--lengths",
        "32",
        "--steps",
        "6",
        "--warmup",
        "1",
        "--rounds",
        "2",
        "--processes",
        "2",
        "--strategies",
        "full",
        "--out",
        str(tmp_path),
    ]
    _run("bench_core.py", argv, monkeypatch)
    result = json.loads((tmp_path / "bench_core.json").read_text())
    processes = [json.loads((tmp_path / f"process-{k}" / "bench_core.json").read_text()) for k in (1, 2)]
    full = next(r for r in result["rows"] if r["strategy"] == "full")
    assert full["decode_ms_rounds"] == sum(
        (next(r for r in p["rows"] if r["strategy"] == "full")["decode_ms_rounds"] for p in processes), []
    )  # four rounds, process by process
    [target] = result["targets"]
    assert len(target["per_process"]) == 2 and result["meta"]["processes"] == 2
    assert "each process" in (tmp_path / "bench_core.md").read_text()

    # A rerun keeps a process made by the same command at this commit of a clean tree, and runs none anew
    for k, process in enumerate(processes, 1):
        process["meta"].update(git_commit=provenance("random:tiny", None)["git_commit"], git_dirty=False)
        (tmp_path / f"process-{k}" / "bench_core.json").write_text(json.dumps(process))

    real_run = subprocess.run

    def only_git(command, *args, **kwargs):  # provenance asks git; a benchmark process must not start
        assert command[0] == "git", f"ran a process again: {command}"
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", only_git)
    _run("bench_core.py", argv, monkeypatch)
    assert json.loads((tmp_path / "bench_core.json").read_text())["rows"] == result["rows"]


def test_eviction_budgets_take_members_with_parameters():
    """bench_eviction sets each member's ratio from its bytes per token, a member given with parameters included."""
    bench = runpy.run_path(str(REPO / "experiments" / "bench_eviction.py"))
    config = load_model("random:smollm2-135m")[0].config
    chosen = bench["strategies_at"](0.5, ["tova", "tova:observe=8", "h2o"], 512, config, torch.bfloat16)
    assert chosen["tova:observe=8"].startswith("tova:observe=8,ratio=")
    assert parse_strategy(chosen["tova:observe=8"]).retention.observe == 8
    full = bytes_per_token(config, "full", torch.bfloat16)
    for member in ("tova", "tova:observe=8", "h2o"):  # h2o's score state costs more bytes per token: a lower ratio
        ratio = parse_strategy(chosen[member]).retention.ratio
        assert abs(ratio * bytes_per_token(config, chosen[member], torch.bfloat16) - 0.5 * full) < 1e-3 * full
    assert chosen["tova"].split("ratio=")[1] == chosen["tova:observe=8"].split("ratio=")[1]
    assert parse_strategy(chosen["h2o"]).retention.ratio < parse_strategy(chosen["tova"]).retention.ratio


def test_eviction_summary_counts_correct_answers_by_seed():
    bench = runpy.run_path(str(REPO / "experiments" / "bench_eviction.py"))
    cases = {
        ("passkey", 512, 0.0, 0): {"correct": True},
        ("passkey", 512, 0.5, 0): {"correct": False},
        ("passkey", 512, 0.0, 1): {"correct": True},
    }
    rows = bench["by_seed"](
        {("full", "inside"): cases, ("tova:ratio=0.5", "inside"): {}},
        ["inside"],
        {"full": "100%", "tova:ratio=0.5": "50% of full's bytes"},
    )
    assert "| inside | `full` | 1/2 | 1/1 |" in rows and not [r for r in rows if "tova" in r]  # no cases: no row
    assert rows[3] == "| question | strategy | seed 0 | seed 1 |"


def test_kvzip_bench_times_the_scoring_pass_against_a_prefill_in_paired_rounds(tmp_path, monkeypatch):
    argv = ["--model", "random:tiny", "--lengths", "24,40", "--rounds", "3", "--strategy", "kvzip:budget=8"]
    _run("bench_kvzip.py", [*argv, "--out", str(tmp_path)], monkeypatch)
    result = json.loads((tmp_path / "kvzip_pass.json").read_text())
    assert result["meta"]["model"] == "random:tiny" and result["meta"]["calibration"]["prefill_1k_s"] > 0
    assert [r["length"] for r in result["rows"]] == [24, 40]
    for row in result["rows"]:
        assert len(row["full_ttft_s"]) == len(row["kvzip_ttft_s"]) == 3  # the warm-up round is not kept
        low, high = row["pass_interval"]
        assert low <= row["pass_in_prefills"] <= high
    table = (tmp_path / "kvzip_pass.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table if line.startswith("| 24") or line.startswith("| 40")] == [
        "24",
        "40",
    ]
    with pytest.raises(SystemExit, match="already holds kvzip_pass.json"):
        _run("bench_kvzip.py", [*argv, "--out", str(tmp_path)], monkeypatch)


def test_reuse_bench_saves_loads_and_restores_every_strategy_against_a_re_prefill(tmp_path, monkeypatch):
    argv = ["--model", "random:tiny", "--lengths", "24,40", "--strategies", "full,int8,kvzip:ratio=0.5"]
    _run("bench_reuse.py", [*argv, "--rounds", "2", "--out", str(tmp_path)], monkeypatch)
    result = json.loads((tmp_path / "reuse.json").read_text())
    rows = {(r["strategy"], r["length"]): r for r in result["rows"]}
    assert set(rows) == {(s, n) for s in ("full", "int8", "kvzip:ratio=0.5") for n in (24, 40)}
    for row in rows.values():
        assert len(row["rounds"]) == 2 and row["load_s"] <= row["restore_s"]
        low, high = row["restore_vs_prefill_interval"]
        assert low <= row["restore_vs_prefill"] <= high
        assert row["kv_bytes"] < row["file_bytes"] < row["kv_bytes"] + 64_000  # as stored, plus the header
    assert rows[("int8", 40)]["file_bytes"] < 0.6 * rows[("full", 40)]["file_bytes"]
    assert rows[("kvzip:ratio=0.5", 40)]["kv_bytes"] < 0.75 * rows[("full", 40)]["kv_bytes"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reuse.json", "reuse.md"]  # no cache file left
