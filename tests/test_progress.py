"""Progress that tells the truth: a calibration timed on the run's model, a cost per cell from the work it declares,
the grid and the estimate printed before the first cell, and a bar that advances by estimated seconds."""

import json

import pytest
from kvcompress.evals.backends import Progress
from kvcompress.evals.cells import cell_keys, latency_warmup
from kvcompress.evals.config import ReportConfig
from kvcompress.evals.cost import Calibration, Work, cell_costs, cell_work, documents_work, grid_lines
from kvcompress.evals.run import run_report

# a machine whose one-row prefill costs A s per token and B s per token squared, whose decode step costs C0 s plus, per
# row, C1 s and D s per context token
A, B, C0, C1, D = 2e-3, 4e-7, 0.03, 0.004, 1e-5


def _calibration(a: float = A, b: float = B) -> Calibration:
    prefill = {n: a * n + b * n * n for n in (256, 1024)}
    decode = {(rows, context): C0 + rows * (C1 + D * context) for rows, context in ((1, 256), (1, 1024), (8, 32))}
    return Calibration(prefill, decode, "test CPU", "float32")


def _jobs(config: ReportConfig) -> list[tuple[int, dict]]:
    return [(0, cell) for cell in cell_keys(config)]


def _by_kind(config: ReportConfig, costs: dict[str, float]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for cell in cell_keys(config):
        totals[cell["kind"]] = totals.get(cell["kind"], 0.0) + costs[cell["id"]]
    return totals


def test_the_fit_recovers_the_machine_it_was_timed_on():
    timing = _calibration()
    assert timing.prefill_coefficients == pytest.approx((A, B))
    assert timing.decode_coefficients == pytest.approx((C0, C1, D))
    assert timing.prefill_1k_s == pytest.approx(A * 1024 + B * 1024**2)
    # a prefill of 2,048 tokens after 1,024 cached costs what the 3,072-token prefill costs beyond the 1,024-token one
    assert timing.prefill_seconds(1, 2048, 1024) == pytest.approx(
        timing.prefill_seconds(1, 3072) - timing.prefill_seconds(1, 1024)
    )
    assert timing.decode_seconds(4, 10, 500) == pytest.approx(10 * (C0 + 4 * (C1 + D * 500)))
    assert Calibration.from_record(timing.record()).record() == timing.record()  # what the meta holds reads back


def test_attention_makes_a_longer_prompt_cost_more_than_its_share():
    timing = _calibration()
    short, long = timing.prefill_seconds(1, 1024), timing.prefill_seconds(1, 2048)
    assert long > 2 * short and long == pytest.approx(2 * short + 2 * B * 1024**2)
    flat = _calibration(b=0.0)
    assert flat.prefill_seconds(1, 2048) == pytest.approx(2 * flat.prefill_seconds(1, 1024))


def test_timing_noise_never_gives_negative_costs():
    # a longer prefill cheaper per token, a longer context or more rows cheaper per step
    noisy = Calibration({256: 1.0, 1024: 2.0}, {(1, 256): 0.06, (1, 1024): 0.05, (8, 32): 0.01}, "CPU", "float32")
    a, b = noisy.prefill_coefficients
    assert b == 0 and a == pytest.approx(3.0 / 1280)
    assert min(noisy.decode_coefficients) >= 0 and noisy.decode_seconds(8, 1, 100) > 0


def test_the_estimate_scales_with_the_grid():
    timing = _calibration()
    small = ReportConfig(strategies=["full", "int8"], seeds=3, recall_batch=5)
    doubled = ReportConfig(strategies=["full", "int8"], seeds=6, recall_batch=5)  # 15 -> 30 cases per task, length
    small_costs, doubled_costs = (_by_kind(c, cell_costs(_jobs(c), [c], timing)) for c in (small, doubled))
    assert all(cost > 0 for cost in small_costs.values())
    assert doubled_costs["recall"] == pytest.approx(2 * small_costs["recall"])
    assert doubled_costs["latency"] == pytest.approx(small_costs["latency"])
    # twice the strategies of one kind: each one's cells cost as much again (the shared prefill and reference aside;
    # capacity cells left out: a smaller codec fits more sessions, and costs more)
    two = ReportConfig(strategies=["full", "int8"], recall_batch=5, kv_budget=None)
    three = ReportConfig(strategies=["full", "int8", "int4"], recall_batch=5, kv_budget=None)
    two_costs, three_costs = (cell_costs(_jobs(c), [c], timing) for c in (two, three))
    int8 = sum(two_costs[cell["id"]] for cell in cell_keys(two) if cell["strategy"] == "int8")
    assert sum(three_costs.values()) == pytest.approx(sum(two_costs.values()) + int8)


def test_a_longer_latency_prompt_costs_more_than_twice():
    timing = _calibration()
    costs = {}
    for length in (512, 1024):
        config = ReportConfig(strategies=["full"], lengths=[length], latency_rounds=1)
        (cell,) = [c for c in cell_keys(config) if c["kind"] == "latency"]
        costs[length] = cell_costs([(0, cell)], [config], timing)[cell["id"]]
    assert costs[1024] > costs[512] > 0
    prefills = timing.prefill_seconds(1, 1024) - 2 * timing.prefill_seconds(1, 512)
    assert costs[1024] - 2 * costs[512] == pytest.approx(prefills + _decode_growth(timing, config), rel=1e-6)


def _decode_growth(timing: Calibration, config: ReportConfig) -> float:
    """What the longer context adds to the latency cell's decode steps, less twice the shorter's (the fixed cost
    counted once)."""
    steps = config.decode_steps + latency_warmup(config.decode_steps)
    return timing.decode_seconds(1, steps, 1024) - 2 * timing.decode_seconds(1, steps, 512)


def test_an_extra_pass_the_retention_declares_costs_a_prefill_over_the_prompt():
    """kvzip declares a reconstruction: its cells cost a prefill of the prompt over the prompt cached more than a
    strategy of the same cells without one."""
    timing = _calibration()
    config = ReportConfig(strategies=["full", "int8", "kvzip:budget=64"], lengths=[512], latency_rounds=1)
    costs = cell_costs(_jobs(config), [config], timing)
    latency = {c["strategy"]: costs[c["id"]] for c in cell_keys(config) if c["kind"] == "latency"}
    assert latency["kvzip:budget=64"] - latency["int8"] == pytest.approx(timing.prefill_seconds(1, 512, 512))
    fidelity = {c["strategy"]: costs[c["id"]] for c in cell_keys(config) if c["kind"] == "fidelity"}
    windows, prefill = config.fidelity_windows, config.fidelity_prefill
    extra = timing.prefill_seconds(windows, prefill, prefill)
    assert fidelity["kvzip:budget=64"] - fidelity["int8"] == pytest.approx(extra)
    assert documents_work("kvzip:budget=64", [(300, 8)]).prefill == [(1, 300, 0), (1, 300, 300)]
    assert documents_work("int8", [(300, 8), (200, 4)], batch_size=2) == Work([(2, 300, 0)], [(2, 8, 300)])


def test_shared_work_goes_to_the_first_cell_left_and_finished_cells_cost_nothing():
    timing = _calibration()
    config = ReportConfig(strategies=["full", "int8"], tasks=["passkey"], lengths=[512], depths=2, seeds=2)
    jobs = _jobs(config)
    recall = [job for job in jobs if job[1]["kind"] == "recall"]  # one batch of 4 cases, full and int8 by case
    work = cell_work(recall, [config])
    first_full, first_int8 = (work[cell["id"]] for _, cell in recall[:2])
    assert first_full.prefill[0] == (4, 512 - 24, 0)  # the batch's context prefill, once, with full's pass
    assert len(first_full.prefill) == 2 and first_int8.prefill == [(4, 24, 512 - 24)]
    assert all(work[cell["id"]] == Work() for _, cell in recall[2:])  # batch-mates: done by the first
    resumed = [job for job in jobs if job not in recall[:2]]  # the first case finished in an earlier run
    costs, whole = cell_costs(resumed, [config], timing), cell_costs(jobs, [config], timing)
    assert set(costs) == {cell["id"] for _, cell in resumed}
    assert costs[recall[2][1]["id"]] == pytest.approx(whole[recall[0][1]["id"]])  # the batch now runs from case 2
    assert sum(costs.values()) == pytest.approx(sum(whole.values()))  # the batch is redone whole: same work


def test_a_random_model_costs_only_its_latency_cells():
    config = ReportConfig(model="random:tiny", strategies=["full", "int8"])
    costs = cell_costs(_jobs(config), [config], _calibration())
    kinds = _by_kind(config, costs)
    assert kinds["recall"] == kinds["fidelity"] == 0 and kinds["latency"] > 0


def test_the_bar_advances_by_cost_to_its_total():
    costs = {"a": 1.5, "b": 0.0, "c": 3.0}
    progress = Progress(costs, "test")
    assert progress.bar.total == pytest.approx(4.5)
    progress.advance("a", running=2)
    assert progress.bar.n == pytest.approx(1.5) and "1/3, failed 0, running 2" in progress.bar.postfix
    progress.advance("b", failed=True)
    progress.advance("c")
    assert progress.bar.n == pytest.approx(progress.bar.total) and "3/3, failed 1" in progress.bar.postfix
    progress.close()


def test_grid_lines_name_the_grid_and_the_estimate():
    # 2 tasks x 2 lengths x 5 depths x 3 seeds; latency at 2 lengths
    config = ReportConfig(strategies=["full", "int8", "int4"], latency_lengths=[384, 768])
    jobs = _jobs(config)
    costs = dict.fromkeys((cell["id"] for _, cell in jobs), 2.0)
    grid, estimate = grid_lines([config], jobs[3:], costs, finished=3)
    assert grid == (
        "grid: 3 strategies x 69 cells (recall 60 (2 tasks x 2 lengths x 15 cases), latency 6 (2 lengths x 3 rounds), "
        "capacity 2 (at a 68.2 MiB KV budget at 768 tokens), fidelity 1) = 207 cells"
    )
    assert estimate.startswith("estimate: 204 cells to run (3 finished earlier, not counted), 6 min 48 s of work")


def test_a_run_prints_its_grid_and_estimate_and_records_its_calibration(tmp_path, capsys):
    config = ReportConfig(model="random:tiny", strategies=["full", "int8"], lengths=[64], decode_steps=4)
    run_report(config, tmp_path / "run")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(("calibration:", "grid:", "estimate:"))]
    assert [line.split(":")[0] for line in lines] == ["calibration", "grid", "estimate"]
    assert "grid: 2 strategies x 35 cells (recall 30 (2 tasks x 1 lengths x 15 cases)" in lines[1]
    assert lines[1].endswith("= 70 cells") and lines[2].startswith("estimate: 70 cells to run, ")
    meta = json.loads((tmp_path / "run" / "records.jsonl").read_text().splitlines()[0])
    calibration = meta["calibration"]
    assert set(calibration["prefill_s"]) == {"256", "1024"} and set(calibration["decode_step_s"]) == {
        "1x256",
        "1x1024",
        "8x32",
    }
    assert calibration["prefill_1k_s"] == calibration["prefill_s"]["1024"] > 0
    assert calibration["device"] == meta["device"] and calibration["compute_dtype"] == meta["compute_dtype"]
    assert f"1k-token prefill {calibration['prefill_1k_s']:.2f} s on {meta['device']}" in lines[0]
    header = (tmp_path / "run" / "pressure_transfer.md").read_text().split("| strategy |")[0]
    assert f"- calibration: 1k-token prefill {calibration['prefill_1k_s']:.2f} s on {meta['device']}" in header


def test_lm_evals_documents_are_counted_from_the_tasks_metadata():
    estimate = pytest.importorskip("kvcompress.evals.lm_eval_estimate", reason="the lm-eval integration needs lm-eval")
    from kvcompress.evals.lm_eval_recall import SHORT_ANSWER_TOKENS

    argv = ["--tasks", "kvc_passkey", "--metadata", json.dumps({"lengths": [200, 400], "depths": 3})]
    docs = estimate.documents(argv, {"pretrained": "default"})
    assert len(docs) == 6 and {round(p, -2) for p, _ in docs} == {200, 400}
    assert {steps for _, steps in docs} == {SHORT_ANSWER_TOKENS}  # a few digits: the short budget
    assert estimate.documents([*argv, "--limit", "2"], {"pretrained": "default"}) == docs[:2]
    timing = _calibration()
    assert timing.seconds(documents_work("kvzip:budget=64", docs)) > timing.seconds(documents_work("int8", docs))
