"""The report as text: the pressure-transfer table and the lines above it, recall by task, and the headline columns
for a terminal. Every renderer reads a row's attributes (rows.py)."""

from __future__ import annotations

import json
from pathlib import Path

from ..provenance import provenance_lines
from . import stats
from .config import ReportConfig
from .rows import GB, ReportRow

COLUMNS = [
    "strategy",
    "HBM saved",
    "at scale",
    "decode latency",
    "TTFT",
    "recall loss",
    "fidelity",
    "host RAM / disk added, transfers",
    "relieved pressure",
    "created pressure",
    "guardrail verdict",
    "rollback trigger",
]


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _with_interval(value, interval, spec: str, suffix: str = "") -> str:
    """'5.0 pts [-27.2, 27.9]': the value and its 95% interval, where there is one."""
    if value is None or not interval or interval[0] == interval[1]:
        return _fmt(value, spec, suffix)
    return f"{value:{spec}}{suffix} [{interval[0]:{spec}}, {interval[1]:{spec}}]"


def _decode_cell(r: ReportRow) -> str:
    return _with_interval(r.decode_change_pct, r.decode_change_interval, "+.1f", "%")


def _recall_cell(r: ReportRow) -> str:
    cell = f"{_with_interval(r.recall_loss_pts, r.recall_loss_interval, '.1f', ' pts')} (n={r.recall_n})"
    survival = r.needle_survival
    return cell + (f"; needle kept {survival:.0%}" if survival is not None and survival < 1 else "")


def _fidelity_cell(r: ReportRow) -> str:
    ppl = f", perplexity {r.ppl_change_pct:+.2f}%" if r.ppl_change_pct is not None else ""
    return f"{_with_interval(r.top1, r.top1_interval, '.1%')}, KL {_fmt(r.kl, '.1e')}{ppl}"


def _offload_cell(r: ReportRow) -> str:
    if not (r.host_bytes or r.disk_bytes):
        return "0 GB"
    cell = f"host {r.host_bytes / GB:.3f} GB, disk {r.disk_bytes / GB:.3f} GB"
    if r.moved_bytes_per_step is not None:
        cell += f"; {r.moved_bytes_per_step / 1e6:.1f} MB/step moved, host waits {r.stall_ms_per_step:.1f} ms/step"
        if r.overlap is not None:
            cell += f" ({r.overlap:.0%} of transfer time hidden)"
    return cell


def _budget_cell(r: ReportRow) -> str:
    """Sessions and tokens/s at the KV budget, each against full's: '12 sessions (3.00x), 95.1 tok/s (2.10x [1.90,
    2.30]), decode +12.0%/token, TTFT 15.20 s'."""
    if r.sessions_at_budget is None:
        return "n/a"
    cell = f"{r.sessions_at_budget} sessions ({_fmt(r.sessions_vs_full, '.2f', 'x')})"
    if r.sessions_at_budget == 0:
        return cell
    tokens = _with_interval(r.tokens_per_s_vs_full, r.tokens_per_s_vs_full_interval, ".2f", "x")
    cell += f", {r.tokens_per_s_at_budget:.1f} tok/s ({tokens})"
    if r.decode_change_at_budget_pct is not None:
        cell += f", decode {r.decode_change_at_budget_pct:+.1f}%/token"
    return cell + f", TTFT {_fmt(r.ttft_s_at_budget, '.2f', ' s')}"


def _output_cell(r: ReportRow) -> str:
    """'212 tok (+8.0% [+1.2, +15.3]), 25% capped'."""
    if r.output_tokens is None:
        return "n/a"
    change = _with_interval(r.output_change_pct, r.output_change_interval, "+.1f", "%")
    return f"{r.output_tokens:.0f} tok ({change}), {r.output_capped:.0%} capped"


def table(rows: list[ReportRow], config: ReportConfig) -> str:
    budget, outputs = config.kv_budget is not None, config.outputs > 0
    columns = list(COLUMNS)
    if budget:
        columns.insert(columns.index("decode latency"), "at the KV budget")
    if outputs:
        columns.insert(columns.index("recall loss"), "output length")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [
            f"`{r.label}`",
            f"{_fmt(r.hbm_saved_pct, '.1f', '%')} ({_fmt(r.hbm_saved_gb, '.4f', ' GB')} at {r.measured_length} tok)",
            f"{r.scale_kv_gb:.1f} GB KV on device, {r.scale_saved_gb:.1f} GB saved "
            f"({config.sessions} x {config.context} tok)",
            *([_budget_cell(r)] if budget else []),
            _decode_cell(r),
            _fmt(r.ttft_change_pct, "+.1f", "%"),
            *([_output_cell(r)] if outputs else []),
            _recall_cell(r),
            f"top-1 {_fidelity_cell(r)}",
            _offload_cell(r),
            r.relieved,
            r.created,
            r.verdict,
            r.rollback,
        ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def header_lines(meta: dict, config: ReportConfig, rows: list[ReportRow], records: list[dict]) -> list[str]:
    """The lines above the table: the run's provenance and how each column was measured and judged."""
    t, budget = config.thresholds, config.kv_budget is not None
    dtypes = (
        f"- dtypes: KV stored as {meta['kv_dtype']}, computed in {meta['compute_dtype']}: {meta['dtype_reason']}; "
        f"weights {meta.get('weights', meta['compute_dtype'])}; every byte counted is a stored byte"
        if "kv_dtype" in meta
        else None
    )
    calibration = meta.get("calibration")  # runs from before calibrations hold none
    calibrated = (
        f"- calibration: 1k-token prefill {calibration['prefill_1k_s']:.2f} s on {calibration['device']} "
        f"({calibration['compute_dtype']}, one row, plain cache): this run's timings scale with it"
        if calibration
        else None
    )
    return [
        "# Pressure-transfer table",
        "",
        *provenance_lines(meta),
        *([dtypes] if dtypes else []),
        *([calibrated] if calibrated else []),
        *(
            _lm_eval_lines(meta["lm_eval"])
            if "lm_eval" in meta
            else [
                f"- recall: {', '.join(config.tasks)} at {', '.join(map(str, config.lengths))} tokens, {config.depths} "
                f"depths, {config.seeds} seed(s)"
                + (f", in left-padded batches of up to {config.recall_batch} cases" if config.recall_batch > 1 else "")
                + "; exact match; loss in points against `full` on the same prompts",
                f"- HBM saved: measured resident KV after prefill + decode at the longest length; at scale: "
                f"{config.sessions} sessions x {config.context} tokens from the analytic formula the measurement is "
                f"tested against",
                f"- latency: decode ms/token p50 vs `full` at {rows[0].latency_length} tokens, over "
                f"{config.latency_rounds} interleaved round(s) of {config.decode_steps} steps" + _compiled(records),
                *(
                    [
                        f"- at the KV budget: the most sessions of {rows[0].latency_length} tokens whose measured peak "
                        f"KV (resident plus the largest transient) fits "
                        f"{config.budget_at(rows[0].latency_length) / 2**20:.1f} MiB, each "
                        f"prefilled after the others, decoded as one batch; tokens/s against `full`'s at the same "
                        f"budget over {config.capacity_rounds} round(s), its interval resampling "
                        + ("rounds" if config.capacity_rounds > 1 else "steps")
                    ]
                    if budget
                    else []
                ),
            ]
        ),
        *(
            [
                f"- output length: {config.outputs} passages of the fidelity text at {max(config.lengths)} tokens, "
                f"each with a request for a long retelling, generated greedily to EOS or {config.output_cap} tokens; "
                f"mean tokens per answer against `full`'s on the same prompts (paired bootstrap interval)"
            ]
            if config.outputs
            else []
        ),
        f"- fidelity: teacher-forced top-1 / KL / perplexity vs `full` over {config.fidelity_windows} windows of "
        f"{config.fidelity_text or 'Northanger Abbey (shipped, public domain)'} x {config.fidelity_steps} steps after "
        f"{config.fidelity_prefill} tokens",
        f"- guardrails: recall loss <= {t.recall_loss_pts:g} pts, decode latency <= +{t.decode_latency_pct:g}%, "
        f"top-1 >= {t.top1:.0%}; each judged on its 95% interval [in brackets]: recall loss paired against `full` "
        f"(exact, McNemar-consistent), top-1 Clopper-Pearson over the predictions, decode a bootstrap of the ratio of "
        f"median step times that resamples whole rounds (one round: its steps); `fail` only when the whole interval "
        f"breaks the guardrail, `pass` only when the whole of "
        f"it keeps it, else `inconclusive (n too small)` (identical recall passes a 2-point guardrail from "
        f"{stats.min_cases_for_pass(t.recall_loss_pts)} cases)",
        "",
    ]


def _compiled(records: list[dict]) -> str:
    """Which strategies' decode steps ran compiled (`--compile`) and which ran eager, as the latency records say."""
    latency = [r for r in records if r.get("kind") == "latency"]
    compiled = sorted({r["strategy"] for r in latency if r.get("compiled")})
    if not compiled:
        return ""
    eager = sorted({r["strategy"] for r in latency if not r.get("compiled")})
    how = next(r["compiled"] for r in latency if r.get("compiled"))
    return f"; decode steps compiled whole ({how}, static storage) for {', '.join(compiled)}" + (
        f"; eager (no static step: eviction, offload or a codec residual) for {', '.join(eager)}" if eager else ""
    )


def _lm_eval_lines(lm_eval: dict) -> list[str]:
    return [
        f"- recall: lm-eval's score of each document (`--log_samples`) on {', '.join(lm_eval['tasks'])}, the "
        f"question inside the prompt, a document recalled when its score is whole; loss in points against `full` "
        f"on the same documents; each strategy's lm-eval run in its own folder ({lm_eval['model_args']}"
        f",strategy=S)",
        "- HBM saved and latency: from each run's requests (`kvcompress_requests.jsonl`): resident KV after each "
        "request, mean over the run, against `full`'s; decode ms/token p50 over the requests vs `full`'s, "
        "judged on their spread; at scale: the analytic formula",
    ]


def by_task(sections: list[tuple[ReportConfig, list[dict], list[ReportRow]]]) -> str:
    """Recall of each strategy on each task, k/n: where a strategy's loss comes from."""
    lines = []
    for config, mine, rows in sections:
        recall = [r for r in mine if r["kind"] == "recall" and r.get("outcome") == "ok"]
        tasks = sorted({r["task"] for r in recall})
        if not tasks:
            continue
        lines += [
            "",
            f"## Recall by task{f' ({config.model})' if len(sections) > 1 else ''}",
            "",
            "| strategy | " + " | ".join(tasks) + " |",
            "|---|" + "---|" * len(tasks),
        ]
        for row in rows:
            cells = []
            for task in tasks:
                outcomes = [
                    r["correct"]
                    for r in recall
                    if r["strategy"] == row.strategy
                    and r["task"] == task
                    and r.get("question", "after") == row.question
                ]
                cells.append(f"{sum(outcomes)}/{len(outcomes)}")
            lines.append(f"| `{row.label}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n" if lines else "")


def terminal_rows(out: Path) -> tuple[list[str], list[list[str]]]:
    """The table's headline columns for a terminal (the Markdown file keeps every column)."""
    rows = [ReportRow.from_dict(r) for r in json.loads((Path(out) / "summary.json").read_text())["rows"]]
    header = ["strategy", "HBM saved", "decode", "recall loss", "top-1, KL", "verdict"]
    several = len({r.model for r in rows}) > 1
    return header, [
        [
            f"{r.model}: {r.label}" if several else r.label,
            _fmt(r.hbm_saved_pct, ".1f", "%"),
            _decode_cell(r),
            _recall_cell(r),
            _fidelity_cell(r),
            r.verdict,
        ]
        for r in rows
    ]
