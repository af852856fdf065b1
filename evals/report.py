"""From records to the pressure-transfer table: what each strategy relieves (HBM), what it creates (recall,
fidelity, latency, host RAM / PCIe), whether it passes the guardrails, and when to roll it back."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from ..accounting import expected_kv_bytes, kv_sizer
from ..dtypes import parse_dtype
from ..models import load_config
from ..provenance import provenance_lines
from ..strategy import parse_strategy
from . import stats
from .cells import cell_keys
from .config import ReportConfig, Thresholds, configs_of
from .latency import latency_cells
from .plots import plot_all
from .records import RecordStore
from .stats import FAIL, INCONCLUSIVE, paired_recall, proportion_interval, ratio_interval, rounds_ratio_interval

GB = 1e9
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


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarize(records: list[dict], config: ReportConfig) -> list[dict]:
    """One row per strategy: measured figures and the words around them."""
    ok = [r for r in records if r.get("outcome") == "ok"]
    recall = [r for r in ok if r["kind"] == "recall"]
    longest = max((r["length"] for r in recall), default=None)
    latency = latency_cells(ok)
    latency_length = max((length for _, length in latency), default=None)
    fidelity = {r["strategy"]: r for r in ok if r["kind"] == "fidelity"}
    full_correct = {_case(r): r["correct"] for r in recall if r["strategy"] == "full"}
    model_config = load_config(config.model)
    dtype = parse_dtype(config.kv_dtype)
    full_at_scale = expected_kv_bytes(model_config, "full", config.context, config.sessions, dtype)
    skipped = next((r["reason"] for r in records if r.get("outcome") == "skipped"), None)  # the run skipped recall
    rows = []
    for strategy, question in ((s, q) for s in config.strategies for q in config.questions):
        spec = parse_strategy(strategy)
        mine = [r for r in recall if r["strategy"] == strategy and r.get("question", "after") == question]
        paired = [(full_correct[k], r["correct"]) for r in mine if (k := _case(r)) in full_correct]
        at_longest = [r for r in mine if r["length"] == longest]
        full_longest = [
            r
            for r in recall
            if r["strategy"] == "full" and r["length"] == longest and r.get("question", "after") == question
        ]
        if not any("kv_bytes_final" in r for r in at_longest):  # recall skipped (random weights) or scored without
            # bytes (lm-eval's documents): bytes as the latency cells measured them
            at_longest = [r for r in [latency.get((strategy, latency_length))] if r and "kv_bytes_final" in r]
            full_longest = [r for r in [latency.get(("full", latency_length))] if r and "kv_bytes_final" in r]
        device_bytes = _mean([r["kv_bytes_final"].get("device", 0) for r in at_longest])
        full_bytes = _mean([r["kv_bytes_final"].get("device", 0) for r in full_longest])
        host_bytes = _mean([r["kv_bytes_final"].get("host", 0) for r in at_longest])
        disk_bytes = _mean([r["kv_bytes_final"].get("disk", 0) for r in at_longest])
        lat, lat_full = latency.get((strategy, latency_length)), latency.get(("full", latency_length))
        at_scale = kv_sizer(model_config, spec, dtype).device_bytes(config.context, config.sessions)
        recall_stats = paired_recall([f for f, _ in paired], [c for _, c in paired]) if paired else None
        decode = _decode_change(lat, lat_full)
        top1_interval = _top1_interval(fidelity.get(strategy))
        row = {
            "model": config.model,
            "strategy": strategy,
            "question": question,
            "label": strategy if len(config.questions) == 1 else f"{strategy} [question {question}]",
            "recall_n": len(paired),
            "recall_pct": 100 * _mean([c for _, c in paired]) if paired else None,
            "recall_loss_pts": recall_stats and recall_stats.loss_pts,
            "recall_loss_interval": recall_stats and (recall_stats.low_pts, recall_stats.high_pts),
            "recall_p_value": recall_stats and recall_stats.p_value,
            "needle_survival": _mean([r.get("needle_survival") for r in mine]),
            "peak_kv_bytes": _mean([r.get("peak_kv_bytes") for r in at_longest]),
            "measured_length": longest if recall else latency_length,
            "skipped": skipped,
            "kv_bytes": device_bytes,
            "hbm_saved_pct": 100 * (1 - device_bytes / full_bytes) if device_bytes is not None and full_bytes else None,
            "hbm_saved_gb": (full_bytes - device_bytes) / GB if device_bytes is not None and full_bytes else None,
            "scale_kv_gb": at_scale / GB,
            "scale_saved_gb": (full_at_scale - at_scale) / GB,
            "latency_length": latency_length,
            "decode_ms_p50": lat and lat["decode_ms_p50"],
            "decode_change_pct": decode and decode[0],
            "decode_change_interval": decode and decode[1:],
            "ttft_change_pct": 100 * (lat["ttft_s"] / lat_full["ttft_s"] - 1) if lat and lat_full else None,
            "kl": fidelity.get(strategy, {}).get("kl"),
            "top1": fidelity.get(strategy, {}).get("top1"),
            "top1_interval": top1_interval,
            "ppl_change_pct": fidelity.get(strategy, {}).get("ppl_change_pct"),
            "host_bytes": host_bytes or 0,
            "disk_bytes": disk_bytes or 0,
            "moved_bytes_per_step": lat and lat.get("moved_bytes_per_step"),
            "stall_ms_per_step": lat and lat.get("stall_ms_per_step"),
            "overlap": lat and lat.get("overlap"),
            "allocation_failures": sum(
                1 for r in records if r.get("strategy") == strategy and r.get("outcome") == "allocation_failure"
            ),
            "cell_errors": sum(1 for r in records if r.get("strategy") == strategy and r.get("outcome") == "error"),
        }
        row.update(pressures(row, spec, config.thresholds))
        rows.append(row)
    return rows


def _case(record: dict) -> tuple:
    return (
        record["task"],
        record["length"],
        record["depth"],
        record["seed"],
        record.get("question", "after"),
        record.get("doc_id"),
    )  # lm-eval's documents pair by task and document


def _decode_change(lat: dict | None, lat_full: dict | None) -> tuple[float, float, float] | None:
    """Decode latency change in percent against `full` (ratio of medians) with a bootstrap interval that resamples
    whole rounds, paired (round r of both ran minutes apart): steps of one pass are not independent draws, so their
    bootstrap is far narrower than the spread between runs. One round: its steps' bootstrap, the best one pass can
    say; records without per-step times give the point alone."""
    if not (lat and lat_full) or lat.get("decode_ms_p50") is None or lat_full.get("decode_ms_p50") is None:
        return None  # nothing timed (lm-eval requests that generated one token)
    mine, full = lat.get("rounds", {0: lat}), lat_full.get("rounds", {0: lat_full})
    paired = [
        (full[r]["decode_ms"], mine[r]["decode_ms"])
        for r in sorted(set(mine) & set(full))
        if mine[r].get("decode_ms") and full[r].get("decode_ms")
    ]
    if len(paired) > 1:
        return tuple(100 * (x - 1) for x in rounds_ratio_interval([a for a, _ in paired], [b for _, b in paired]))
    if paired:
        return tuple(100 * (x - 1) for x in ratio_interval(*paired[0]))
    change = 100 * (lat["decode_ms_p50"] / lat_full["decode_ms_p50"] - 1)
    return change, change, change


def _top1_interval(record: dict | None) -> tuple[float, float] | None:
    if not record or record.get("top1") is None:
        return None
    return proportion_interval(round(record["top1"] * record["steps"]), record["steps"])


def _judged(
    name: str, value: float, interval, limit: float, higher_is_better: bool, text: str, unit: str = ""
) -> tuple[str, str]:
    """(verdict, words) of one guardrail, judged on the interval (a point is its own interval)."""
    low, high = interval or (value, value)
    shown = text.format(value) + unit + (f" (95% CI {text.format(low)} to {text.format(high)})" if low != high else "")
    bound = (">= " if higher_is_better else "<= ") + text.format(limit) + unit
    return stats.verdict(low, high, limit, higher_is_better), f"{name} {shown} vs {bound}"


def pressures(row: dict, spec, t: Thresholds) -> dict:
    """Relieved and created pressure, guardrail verdict and rollback trigger, in words."""
    baseline = row["strategy"] == "full"
    relieved = []
    if row["hbm_saved_pct"] is not None and row["hbm_saved_pct"] > 0.5:
        relieved.append(f"HBM -{row['hbm_saved_pct']:.1f}% of KV")
    created = []
    retention = spec.retention
    if retention.evicts:
        kept = (
            f"tokens outside each head's top {retention.budget or f'{retention.ratio:.0%}'} by score are gone"
            if retention.seam
            else f"tokens older than the {retention.capacity(0)}-token budget are gone"
        )
        created.append(
            f"recall: {kept}" + (f" (-{row['recall_loss_pts']:.1f} pts measured)" if row["recall_loss_pts"] else "")
        )
    elif row["recall_loss_pts"] and row["recall_loss_pts"] > 0:
        created.append(f"recall -{row['recall_loss_pts']:.1f} pts")
    if not spec.codec.lossless and row["top1"] is not None:
        created.append(f"fidelity: top-1 {row['top1']:.1%}, KL {row['kl']:.1e}")
    if row["decode_change_pct"] is not None and row["decode_change_pct"] > 1:
        created.append(f"decode latency +{row['decode_change_pct']:.0f}%")
    if row["host_bytes"] or row["disk_bytes"]:
        where = " + ".join(
            f"{name} {row[f'{name}_bytes'] / GB:.3f} GB" for name in ("host", "disk") if row[f"{name}_bytes"]
        )
        created.append(
            f"{where} holding KV"
            + (
                f"; {row['moved_bytes_per_step'] / 1e6:.1f} MB moved per decode step"
                if row["moved_bytes_per_step"]
                else ""
            )
        )
    # a guardrail fails only when its whole 95% interval is on the wrong side, passes only when the whole of it is
    # on the right side, and is inconclusive (n too small) otherwise
    judged = []
    if row["recall_loss_pts"] is not None:
        judged.append(
            _judged(
                "recall loss",
                row["recall_loss_pts"],
                row.get("recall_loss_interval"),
                t.recall_loss_pts,
                False,
                "{:.1f}",
                " pts",
            )
        )
    if row["decode_change_pct"] is not None:
        judged.append(
            _judged(
                "decode",
                row["decode_change_pct"],
                row.get("decode_change_interval"),
                t.decode_latency_pct,
                False,
                "{:+.0f}",
                "%",
            )
        )
    if row["top1"] is not None:
        judged.append(_judged("top-1", row["top1"], row.get("top1_interval"), t.top1, True, "{:.1%}"))
    failures = [words for outcome, words in judged if outcome == FAIL]
    unsure = [words for outcome, words in judged if outcome == INCONCLUSIVE]
    if row["allocation_failures"]:
        failures.append(f"{row['allocation_failures']} allocation failures")
    measured = ("decode_change_pct", "hbm_saved_pct") + (() if row.get("skipped") else ("recall_loss_pts", "top1"))
    missing = [name for name in measured if row[name] is None]
    if baseline:
        verdict, relieved, created = "baseline", ["none (baseline)"], ["none (baseline)"]
    elif missing:
        verdict = "incomplete: no " + ", ".join(missing)
    else:
        verdict = (
            "fail: " + "; ".join(failures)
            if failures
            else "inconclusive (n too small): " + "; ".join(unsure)
            if unsure
            else "pass"
        )
    rollback = (
        f"roll back to full when live needle probes lose > {t.recall_loss_pts:g} pts, decode p95 rises "
        f"> {t.decode_latency_pct:g}% or top-1 agreement drops < {t.top1:.0%}"
    )
    if retention.evicts:
        rollback += (
            ", or needle probes show the fact evicted (needle survival falls)"
            if retention.seam
            else f", or users report facts older than {retention.capacity(0)} tokens forgotten"
        )
    complete = baseline or bool(relieved and created)
    if not complete:
        verdict = "incomplete: cannot name " + ("relieved" if not relieved else "created") + " pressure"
    if row.get("cell_errors") and not baseline:
        verdict = f"incomplete: {row['cell_errors']} cells lost with their worker (--resume reruns them); " + verdict
    if row.get("skipped"):
        verdict += f" (memory and latency only: {row['skipped']})"
    return {
        "relieved": "; ".join(relieved) or "-",
        "created": "; ".join(created) or "-",
        "verdict": verdict,
        "rollback": "-" if baseline else rollback,
        "complete": complete,
    }


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _with_interval(value, interval, spec: str, suffix: str = "") -> str:
    """'5.0 pts [-27.2, 27.9]': the value and its 95% interval, where there is one."""
    if value is None or not interval or interval[0] == interval[1]:
        return _fmt(value, spec, suffix)
    return f"{value:{spec}}{suffix} [{interval[0]:{spec}}, {interval[1]:{spec}}]"


def _decode_cell(r: dict) -> str:
    return _with_interval(r["decode_change_pct"], r.get("decode_change_interval"), "+.1f", "%")


def _recall_cell(r: dict) -> str:
    cell = f"{_with_interval(r['recall_loss_pts'], r.get('recall_loss_interval'), '.1f', ' pts')} (n={r['recall_n']})"
    survival = r.get("needle_survival")
    return cell + (f"; needle kept {survival:.0%}" if survival is not None and survival < 1 else "")


def _fidelity_cell(r: dict) -> str:
    ppl = f", perplexity {r['ppl_change_pct']:+.2f}%" if r.get("ppl_change_pct") is not None else ""
    return f"{_with_interval(r['top1'], r.get('top1_interval'), '.1%')}, KL {_fmt(r['kl'], '.1e')}{ppl}"


def _offload_cell(r: dict) -> str:
    if not (r["host_bytes"] or r["disk_bytes"]):
        return "0 GB"
    cell = f"host {r['host_bytes'] / GB:.3f} GB, disk {r['disk_bytes'] / GB:.3f} GB"
    if r["moved_bytes_per_step"] is not None:
        cell += (
            f"; {r['moved_bytes_per_step'] / 1e6:.1f} MB/step moved, host waits {r['stall_ms_per_step']:.1f} ms/step"
        )
        if r.get("overlap") is not None:
            cell += f" ({r['overlap']:.0%} of transfer time hidden)"
    return cell


def table(rows: list[dict], config: ReportConfig) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [
            f"`{r['label']}`",
            f"{_fmt(r['hbm_saved_pct'], '.1f', '%')} ({_fmt(r['hbm_saved_gb'], '.4f', ' GB')} "
            f"at {r['measured_length']} tok)",
            f"{r['scale_kv_gb']:.1f} GB KV on device, {r['scale_saved_gb']:.1f} GB saved "
            f"({config.sessions} x {config.context} tok)",
            _decode_cell(r),
            _fmt(r["ttft_change_pct"], "+.1f", "%"),
            _recall_cell(r),
            f"top-1 {_fidelity_cell(r)}",
            _offload_cell(r),
            r["relieved"],
            r["created"],
            r["verdict"],
            r["rollback"],
        ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def grid_records(records: list[dict], config: ReportConfig) -> list[dict]:
    """The records of `config`'s cells: a records file may hold other models' cells and, after a grid was widened or
    narrowed, cells outside it; a cell whose worker died (`error`) counts until a rerun finishes it."""
    wanted = {cell["id"] for cell in cell_keys(config)}
    finished = {r["id"] for r in records if "id" in r and r.get("outcome") != "error"}
    return [
        r
        for r in records
        if "id" not in r  # files from before content-addressed cells: one grid, all of it
        or (r["id"] in wanted and (r.get("outcome") != "error" or r["id"] not in finished))
    ]


def write_report(out: Path) -> Path:
    """summary.csv, pressure_transfer.md and the plots from out/records.jsonl (a section per model when the run
    swept several); returns the table's path."""
    out = Path(out)
    store = RecordStore(out / "records.jsonl")
    meta, configs = store.meta, configs_of(store.meta)
    sections = [(c, records, summarize(records, c)) for c in configs for records in [grid_records(store.records, c)]]
    rows = [row for _, _, mine in sections for row in mine]
    config = configs[0]
    with (out / "summary.csv").open("w", newline="") as f:
        # every row names the run that produced it, so a copied CSV keeps its provenance
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "command", "device", "git_commit"])
        writer.writeheader()
        writer.writerows({**r, **{k: meta[k] for k in ("command", "device", "git_commit")}} for r in rows)
    t = config.thresholds
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
    header = [
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
                f"- latency: decode ms/token p50 vs `full` at {rows[0]['latency_length']} tokens, over "
                f"{config.latency_rounds} interleaved round(s) of {config.decode_steps} steps"
                + _compiled(store.records),
            ]
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
    path = out / "pressure_transfer.md"
    # CommonMark needs a blank line between the list and the table, or the table is swallowed by the last item
    body = (
        table(rows, config)
        if len(configs) == 1
        else "\n".join(f"## {c.model}\n\n{table(mine, c)}" for c, _, mine in sections)
    )
    path.write_text("\n".join(header) + "\n" + body + _by_task(sections))
    (out / "summary.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    for c, records, mine in sections:  # several models: each model's plots in a folder of its own
        folder = (
            out if len(configs) == 1 else out / "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in c.model)
        )
        folder.mkdir(exist_ok=True)
        plot_all(records, mine, c, folder)
    return path


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


def _by_task(sections) -> str:
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
                    if r["strategy"] == row["strategy"]
                    and r["task"] == task
                    and r.get("question", "after") == row["question"]
                ]
                cells.append(f"{sum(outcomes)}/{len(outcomes)}")
            lines.append(f"| `{row['label']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n" if lines else "")


def terminal_rows(out: Path) -> tuple[list[str], list[list[str]]]:
    """The table's headline columns for a terminal (the Markdown file keeps every column)."""
    rows = json.loads((Path(out) / "summary.json").read_text())["rows"]
    header = ["strategy", "HBM saved", "decode", "recall loss", "top-1, KL", "verdict"]
    several = len({r.get("model") for r in rows}) > 1
    return header, [
        [
            f"{r['model']}: {r['label']}" if several else r["label"],
            _fmt(r["hbm_saved_pct"], ".1f", "%"),
            _decode_cell(r),
            _recall_cell(r),
            _fidelity_cell(r),
            r["verdict"],
        ]
        for r in rows
    ]
