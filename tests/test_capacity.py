"""The report's serving cells: capacity at a KV budget (`--kv-budget`: the most sessions whose measured peak KV fits,
decoded as one batch) on a tiny random-weight model, free answers' length (`--outputs`) on the default model, and
the rows' figures against full's from hand-made records."""

import json

import pytest
import torch
from kvcompress.evals.cells import CELL_SETTINGS, cell_keys
from kvcompress.evals.config import AUTO_SESSIONS, ReportConfig
from kvcompress.evals.cost import cell_work
from kvcompress.evals.harness import Harness
from kvcompress.evals.run import run_report
from kvcompress.evals.stats import paired_mean_ratio_interval
from kvcompress.evals.summary import summarize

from kvcompress import make_cache
from kvcompress.accounting import expected_kv_bytes
from kvcompress.models import load_config

BUDGET = 2**20
TINY = dict(model="random:tiny", tasks=["passkey"], lengths=[96], depths=1, seeds=1, decode_steps=4)


@pytest.fixture(scope="module")
def harness():
    return Harness(ReportConfig(**TINY, strategies=["full", "int8", "window:window=32"], kv_budget="1MiB"))


@pytest.mark.parametrize("strategy", ["full", "int8", "window:window=32", "tova:budget=32"])
def test_admitted_sessions_fit_the_budget_and_one_more_would_not(harness, strategy):
    record = harness.capacity(strategy, 96)
    assert record["sessions"] > 1 and record["kv_budget"] == BUDGET
    assert record["peak_kv_bytes"] <= BUDGET and record["tried"][-1] == [record["sessions"], record["peak_kv_bytes"]]
    assert all(peak > BUDGET for _, peak in record["tried"][:-1])  # every batch stepped down from was over it
    with make_cache(harness.model, strategy) as prefilled:  # one more session, measured as the cell measures
        logits = harness.model(input_ids=harness._text_ids(96), cache=prefilled, use_cache=True).logits
        stepped = harness._decoded_together(prefilled, record["sessions"] + 1, int(logits[0, -1].argmax()))[0]
        assert prefilled.peak_bytes == record["session_peak_kv_bytes"]
        one_more = max(record["sessions"] * prefilled.resident_bytes + prefilled.peak_bytes, stepped)
    assert one_more > BUDGET, "a larger batch would have fit: the admitted one is not the most"
    assert len(record["decode_ms"]) == 4 and record["tokens_per_s"] == pytest.approx(
        record["sessions"] / (record["decode_ms_p50"] / 1e3)
    )


def test_evicting_members_admit_more_sessions_than_full(harness):
    full, window = harness.capacity("full", 96), harness.capacity("window:window=32", 96)
    assert window["session_peak_kv_bytes"] < full["session_peak_kv_bytes"]
    assert window["sessions"] > full["sessions"]


def test_the_default_budget_holds_four_full_sessions_of_each_latency_length():
    config = ReportConfig(**TINY, latency_lengths=[48, 96])
    for length in (48, 96):
        one = expected_kv_bytes(load_config("random:tiny"), "full", length + TINY["decode_steps"], dtype=torch.bfloat16)
        assert config.budget_at(length) == AUTO_SESSIONS * one
    assert ReportConfig(**TINY, kv_budget="2MiB").budget_at(48) == 2**21
    assert ReportConfig(**TINY, kv_budget="none").kv_budget is None


def test_capacity_cells_exist_only_with_a_budget_and_a_new_budget_reruns_only_them():
    plain = ReportConfig(**TINY, strategies=["full", "int8"], kv_budget=None)
    budgeted = ReportConfig(**TINY, strategies=["full", "int8"], kv_budget="1MiB", capacity_rounds=2)
    assert not [c for c in cell_keys(plain) if c["kind"] == "capacity"]
    capacity = [c for c in cell_keys(budgeted) if c["kind"] == "capacity"]
    assert [(c["strategy"], c.get("round", 0)) for c in capacity] == [
        ("full", 0),
        ("int8", 0),
        ("full", 1),
        ("int8", 1),
    ]
    wider = ReportConfig(**{**TINY, "strategies": ["full", "int8"], "capacity_rounds": 2, "kv_budget": "2MiB"})
    changed = {c["id"] for c in cell_keys(wider)} ^ {c["id"] for c in cell_keys(budgeted)}
    assert len(changed) == 2 * len(capacity)  # the capacity cells alone have new ids


@pytest.mark.parametrize(
    ("value", "message"),
    [("lots", "kv_budget must look like 80GiB"), (0, "kv_budget must be a positive size"), (True, "kv_budget")],
)
def test_a_bad_budget_is_refused_naming_the_setting(value, message):
    with pytest.raises(ValueError, match=message):
        ReportConfig(**TINY, kv_budget=value)


def test_a_budget_holding_no_session_is_refused_before_any_work(tmp_path):
    config = ReportConfig(**TINY, strategies=["full"], kv_budget=10_000)
    with pytest.raises(ValueError, match=r"kv_budget 0\.01 MiB holds no session of full at 96 tokens"):
        run_report(config, tmp_path)
    assert not (tmp_path / "records.jsonl").exists()


def _capacity(strategy: str, sessions: int, steps_ms: list[list[float]]) -> list[dict]:
    return [
        {
            "kind": "capacity",
            "outcome": "ok",
            "strategy": strategy,
            "length": 96,
            "round": r,
            "kv_budget": BUDGET,
            "sessions": sessions,
            "decode_ms": steps,
            "decode_ms_p50": sorted(steps)[len(steps) // 2],
            "ttft_s": 0.5,
        }
        for r, steps in enumerate(steps_ms)
    ]


def test_the_row_reads_sessions_and_tokens_per_s_against_full():
    config = ReportConfig(**TINY, strategies=["full", "window:window=32"], kv_budget=BUDGET, latency_rounds=2)
    records = _capacity("full", 4, [[10.0] * 5, [10.0] * 5]) + _capacity("window:window=32", 8, [[20.0] * 5] * 2)
    full, window = summarize(records, config)
    assert (full.sessions_at_budget, full.sessions_vs_full, full.tokens_per_s_vs_full) == (4, 1.0, 1.0)
    assert window.sessions_at_budget == 8 and window.sessions_vs_full == 2.0
    assert window.tokens_per_s_at_budget == pytest.approx(8 / 0.020)  # 400 tok/s against full's 4 / 0.010
    assert window.tokens_per_s_vs_full == pytest.approx(1.0)  # twice the sessions, each step twice as long
    assert window.decode_change_at_budget_pct == pytest.approx(100.0)
    assert "2.00x the sessions at the KV budget" in window.relieved
    assert "decode per session at the KV budget +100% (8 sessions in a batch)" in window.created


def test_a_strategy_that_fits_no_session_reads_zero():
    config = ReportConfig(**TINY, strategies=["full", "int8"], kv_budget=BUDGET)
    records = _capacity("full", 2, [[10.0] * 4]) + [
        {"kind": "capacity", "outcome": "ok", "strategy": "int8", "length": 96, "kv_budget": BUDGET, "sessions": 0}
    ]
    _, int8 = summarize(records, config)
    assert (int8.sessions_at_budget, int8.sessions_vs_full, int8.tokens_per_s_vs_full) == (0, 0.0, 0.0)


def test_a_report_with_a_budget_has_the_column_and_its_records(tmp_path):
    config = ReportConfig(**TINY, strategies=["full", "window:window=32"], kv_budget="1MiB", capacity_rounds=2)
    run_report(config, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()[1:]]
    capacity = [r for r in records if r["kind"] == "capacity"]
    assert len(capacity) == 4 and all(r["peak_kv_bytes"] <= BUDGET for r in capacity)
    table = (tmp_path / "pressure_transfer.md").read_text()
    assert "| at the KV budget |" in table
    full, window = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert full["sessions_vs_full"] == 1.0 and window["sessions_vs_full"] > 1
    assert f"{window['sessions_at_budget']} sessions ({window['sessions_vs_full']:.2f}x)" in table


def test_free_answers_are_generated_to_the_cap_and_counted():
    config = ReportConfig(strategies=["full", "window:window=48"], lengths=[64], outputs=2, output_cap=6)
    harness = Harness(config)
    record = harness.output("window:window=48", 64)
    assert record["output_tokens"] == [6, 6] and record["capped"] == [True, True]  # the request invites a long answer
    assert all(n > 64 for n in record["prompt_tokens"])  # the passage and the request, in the chat template


def _output(strategy: str, tokens: list[int], cap: int = 256) -> dict:
    return {
        "kind": "output",
        "outcome": "ok",
        "strategy": strategy,
        "length": 96,
        "output_tokens": tokens,
        "capped": [n == cap for n in tokens],
    }


def test_longer_answers_are_named_as_created_pressure_paired_against_full():
    config = ReportConfig(**TINY, strategies=["full", "int8", "window:window=32"], outputs=4)
    records = [
        _output("full", [100, 120, 80, 256]),
        _output("int8", [100, 120, 80, 256]),
        _output("window:window=32", [150, 180, 120, 256]),
    ]
    full, int8, window = summarize(records, config)
    assert full.output_change_pct == 0.0 and int8.output_change_pct == 0.0 and int8.output_change_interval == (0, 0)
    assert window.output_tokens == pytest.approx(706 / 4) and window.output_capped == 0.25
    assert window.output_change_pct == pytest.approx(100 * (706 / 556 - 1))
    low, high = window.output_change_interval
    assert 0 < low < window.output_change_pct < high
    assert "answers +27% longer than full's" in window.created and "longer" not in int8.created


def test_output_cells_exist_only_when_asked_and_a_bad_count_is_refused():
    assert not [c for c in cell_keys(ReportConfig(**TINY)) if c["kind"] == "output"]
    cells = [
        c for c in cell_keys(ReportConfig(**TINY, strategies=["full", "int8"], outputs=3)) if c["kind"] == "output"
    ]
    assert [(c["strategy"], c["length"]) for c in cells] == [("full", 96), ("int8", 96)]
    with pytest.raises(ValueError, match="outputs must be a number of prompts >= 0, got -1"):
        ReportConfig(**TINY, outputs=-1)
    with pytest.raises(ValueError, match="output_cap must be positive, got 0"):
        ReportConfig(**TINY, output_cap=0)


def test_the_paired_ratio_refuses_unpaired_or_empty_samples():
    with pytest.raises(ValueError, match="a and b must be as many numbers"):
        paired_mean_ratio_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="a's summing above 0"):
        paired_mean_ratio_interval([0.0, 0.0], [1.0, 2.0])
    ratio, low, high = paired_mean_ratio_interval([10.0, 20.0, 30.0], [20.0, 40.0, 60.0])
    assert ratio == low == high == 2.0  # every pair doubled: no resample says otherwise


def test_every_cell_kind_is_a_harness_method_and_is_priced():
    config = ReportConfig(strategies=["full", "int8"], tasks=["passkey"], lengths=[96], kv_budget="1MiB", outputs=1)
    cells = cell_keys(config)
    assert {c["kind"] for c in cells} == set(CELL_SETTINGS)
    assert all(callable(getattr(Harness, kind, None)) for kind in CELL_SETTINGS)
    work = cell_work([(0, c) for c in cells], [config])
    for kind in CELL_SETTINGS:  # the first cell of each kind carries its work
        first = work[next(c["id"] for c in cells if c["kind"] == kind)]
        assert first.prefill and first.decode, kind
