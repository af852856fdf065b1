"""One row of the pressure-transfer report: a strategy's measured figures (`Figures`) and, judged from them, the
pressures it relieves and creates (`ReportRow`). summary.json and summary.csv hold the row's fields, in order."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

GB = 1e9  # the `_gb` fields are decimal gigabytes, as GPUs are sold


@dataclass(frozen=True)
class Figures:
    """What the records measured for one strategy and question placement, in groups: who it is (model to label);
    recall paired against `full` on the same cases (recall_n to needle_survival); resident KV bytes at the measured
    length and at the config's scale (peak_kv_bytes to scale_saved_gb); decode and prefill time against `full`
    (latency_length to ttft_change_pct); sessions and tokens/s at a KV budget (kv_budget to ttft_s_at_budget);
    free answers' length against `full`'s (output_tokens to output_capped); teacher-forced fidelity (kl to
    ppl_change_pct); what offload holds and moves (host_bytes to overlap); cells that did not finish
    (allocation_failures, cell_errors). None: not measured."""

    model: str
    strategy: str
    question: str  # where the question sits: after the context or inside the prompt
    label: str  # the strategy, with its question placement when the run had several
    recall_n: int  # cases paired with `full`'s
    recall_pct: float | None
    recall_loss_pts: float | None  # points lost against `full`
    recall_loss_interval: tuple[float, float] | None  # its 95% interval, points
    recall_p_value: float | None
    needle_survival: float | None  # share of the needle's tokens the cache still holds, mean over layers and heads
    peak_kv_bytes: float | None
    measured_length: int | None  # the context length the bytes were measured at
    skipped: str | None  # why the run skipped recall and fidelity (random weights)
    kv_bytes: float | None  # resident device KV bytes at measured_length
    hbm_saved_pct: float | None
    hbm_saved_gb: float | None
    scale_kv_gb: float  # device KV at the config's sessions x context, from the analytic formula
    scale_saved_gb: float
    latency_length: int | None
    decode_ms_p50: float | None
    decode_change_pct: float | None  # decode time per token against `full`
    decode_change_interval: tuple[float, float] | None
    ttft_change_pct: float | None
    kv_budget: int | None  # capacity cells' KV budget, bytes (None: not measured)
    sessions_at_budget: int | None  # the most sessions of latency_length tokens whose measured peak KV fits it
    sessions_vs_full: float | None  # as a multiple of full's
    tokens_per_s_at_budget: float | None  # those sessions decoding as one batch
    tokens_per_s_vs_full: float | None
    tokens_per_s_vs_full_interval: tuple[float, float] | None
    decode_change_at_budget_pct: float | None  # a session's per-token decode time at budget against full's at budget
    ttft_s_at_budget: float | None  # one session's prefill (each session is prefilled after the others)
    output_tokens: float | None  # mean tokens of a freely generated answer (output-length cells)
    output_change_pct: float | None  # against full's answers to the same prompts
    output_change_interval: tuple[float, float] | None
    output_capped: float | None  # share of answers that ran to the cap
    kl: float | None
    top1: float | None  # teacher-forced top-1 agreement with `full`
    top1_interval: tuple[float, float] | None
    ppl_change_pct: float | None
    host_bytes: float
    disk_bytes: float
    moved_bytes_per_step: float | None
    stall_ms_per_step: float | None
    overlap: float | None  # share of transfer time hidden behind compute
    allocation_failures: int
    cell_errors: int  # cells lost with their worker


@dataclass(frozen=True)
class ReportRow(Figures):
    """A row of the report: the figures and the words judged from them against the guardrails."""

    relieved: str  # the pressures the strategy relieves, "-" when none can be named
    created: str  # the pressures it creates
    verdict: str  # baseline, pass, fail, inconclusive or incomplete, with the reasons
    rollback: str  # when to roll back to `full` in production
    complete: bool  # both pressures named (or the baseline)

    @classmethod
    def from_dict(cls, row: dict) -> ReportRow:
        """A row as summary.json holds it (intervals as lists; figures a run did not measure may be absent)."""
        row = {**dict.fromkeys(f.name for f in dataclasses.fields(Figures)), **row}
        return cls(**{name: tuple(value) if isinstance(value, list) else value for name, value in row.items()})

    def as_dict(self) -> dict:
        """The row's fields in order: one row of summary.json and summary.csv."""
        return dataclasses.asdict(self)
