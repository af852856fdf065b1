"""Capacity at a KV budget (`report --kv-budget`): the most sessions whose measured peak KV fits, decoded as one batch,
on a tiny random-weight model (mechanics), and the row's figures against full's from hand-made records."""

import json

import pytest
from kvcompress.evals.cells import cell_keys
from kvcompress.evals.config import ReportConfig
from kvcompress.evals.harness import Harness
from kvcompress.evals.run import run_report
from kvcompress.evals.summary import summarize

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
    one_more = harness._decode_batch(strategy, 96, record["sessions"] + 1)[1]
    assert one_more > BUDGET, "a larger batch would have fit: the admitted one is not the most"
    assert len(record["decode_ms"]) == 4 and record["tokens_per_s"] == pytest.approx(
        record["sessions"] / (record["decode_ms_p50"] / 1e3)
    )


def test_evicting_members_admit_more_sessions_than_full(harness):
    full, window = harness.capacity("full", 96), harness.capacity("window:window=32", 96)
    assert window["session_peak_kv_bytes"] < full["session_peak_kv_bytes"]
    assert window["sessions"] > full["sessions"]


def test_capacity_cells_exist_only_with_a_budget_and_a_new_budget_reruns_only_them():
    plain = ReportConfig(**TINY, strategies=["full", "int8"])
    budgeted = ReportConfig(**TINY, strategies=["full", "int8"], kv_budget="1MiB", latency_rounds=2)
    assert not [c for c in cell_keys(plain) if c["kind"] == "capacity"]
    capacity = [c for c in cell_keys(budgeted) if c["kind"] == "capacity"]
    assert [(c["strategy"], c.get("round", 0)) for c in capacity] == [
        ("full", 0),
        ("int8", 0),
        ("full", 1),
        ("int8", 1),
    ]
    wider = ReportConfig(**{**TINY, "strategies": ["full", "int8"], "latency_rounds": 2, "kv_budget": "2MiB"})
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
    config = ReportConfig(**TINY, strategies=["full", "window:window=32"], kv_budget="1MiB", latency_rounds=2)
    run_report(config, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()[1:]]
    capacity = [r for r in records if r["kind"] == "capacity"]
    assert len(capacity) == 4 and all(r["peak_kv_bytes"] <= BUDGET for r in capacity)
    table = (tmp_path / "pressure_transfer.md").read_text()
    assert "| at the KV budget |" in table
    full, window = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert full["sessions_vs_full"] == 1.0 and window["sessions_vs_full"] > 1
    assert f"{window['sessions_at_budget']} sessions ({window['sessions_vs_full']:.2f}x)" in table
