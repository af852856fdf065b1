"""From records to report rows: each strategy's recall, bytes, latency and fidelity paired against `full` on the same
cells, with their intervals; the words judged from them come from verdicts.py."""

from __future__ import annotations

import statistics

from ..accounting import expected_kv_bytes, kv_sizer
from ..dtypes import parse_dtype
from ..models import load_config
from ..strategy import parse_strategy
from .cells import cell_keys
from .config import ReportConfig
from .latency import latency_cells
from .rows import GB, Figures, ReportRow
from .stats import (
    paired_mean_ratio_interval,
    paired_recall,
    proportion_interval,
    ratio_interval,
    rounds_ratio_interval,
)
from .verdicts import pressures


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarize(records: list[dict], config: ReportConfig) -> list[ReportRow]:
    """One row per strategy: measured figures and the words around them."""
    ok = [r for r in records if r.get("outcome") == "ok"]
    recall = [r for r in ok if r["kind"] == "recall"]
    longest = max((r["length"] for r in recall), default=None)
    latency = latency_cells(ok)
    latency_length = max((length for _, length in latency), default=None)
    capacity = latency_cells(ok, "capacity")
    budget_length = max((length for _, length in capacity), default=None)  # the latency length, as cells are made
    fidelity = {r["strategy"]: r for r in ok if r["kind"] == "fidelity"}
    outputs = {r["strategy"]: r for r in ok if r["kind"] == "output"}
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
        cap, cap_full = capacity.get((strategy, budget_length)), capacity.get(("full", budget_length))
        budget = _at_budget(cap, cap_full)
        top1_interval = _top1_interval(fidelity.get(strategy))
        figures = Figures(
            model=config.model,
            strategy=strategy,
            question=question,
            label=strategy if len(config.questions) == 1 else f"{strategy} [question {question}]",
            recall_n=len(paired),
            recall_pct=100 * _mean([c for _, c in paired]) if paired else None,
            recall_loss_pts=recall_stats and recall_stats.loss_pts,
            recall_loss_interval=recall_stats and (recall_stats.low_pts, recall_stats.high_pts),
            recall_p_value=recall_stats and recall_stats.p_value,
            needle_survival=_mean([r.get("needle_survival") for r in mine]),
            peak_kv_bytes=_mean([r.get("peak_kv_bytes") for r in at_longest]),
            measured_length=longest if recall else latency_length,
            skipped=skipped,
            kv_bytes=device_bytes,
            hbm_saved_pct=100 * (1 - device_bytes / full_bytes) if device_bytes is not None and full_bytes else None,
            hbm_saved_gb=(full_bytes - device_bytes) / GB if device_bytes is not None and full_bytes else None,
            scale_kv_gb=at_scale / GB,
            scale_saved_gb=(full_at_scale - at_scale) / GB,
            latency_length=latency_length,
            decode_ms_p50=lat and lat["decode_ms_p50"],
            decode_change_pct=decode and decode[0],
            decode_change_interval=decode and decode[1:],
            ttft_change_pct=100 * (lat["ttft_s"] / lat_full["ttft_s"] - 1) if lat and lat_full else None,
            kv_budget=cap and cap["kv_budget"],
            sessions_at_budget=cap and cap["sessions"],
            **budget,
            **_output_length(outputs.get(strategy), outputs.get("full")),
            kl=fidelity.get(strategy, {}).get("kl"),
            top1=fidelity.get(strategy, {}).get("top1"),
            top1_interval=top1_interval,
            ppl_change_pct=fidelity.get(strategy, {}).get("ppl_change_pct"),
            host_bytes=host_bytes or 0,
            disk_bytes=disk_bytes or 0,
            moved_bytes_per_step=lat and lat.get("moved_bytes_per_step"),
            stall_ms_per_step=lat and lat.get("stall_ms_per_step"),
            overlap=lat and lat.get("overlap"),
            allocation_failures=sum(
                1 for r in records if r.get("strategy") == strategy and r.get("outcome") == "allocation_failure"
            ),
            cell_errors=sum(1 for r in records if r.get("strategy") == strategy and r.get("outcome") == "error"),
        )
        rows.append(pressures(figures, spec, config.thresholds))
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


def _at_budget(cap: dict | None, cap_full: dict | None) -> dict:
    """A strategy's capacity cell against full's: sessions and tokens/s as multiples of full's (tokens/s with a
    bootstrap interval of full's median step over the strategy's that resamples whole rounds, or one round's steps,
    times the ratio of sessions, which every round admits alike), per-session decode time against full's at budget,
    and TTFT."""
    names = ("sessions_vs_full", "tokens_per_s_at_budget", "tokens_per_s_vs_full", "tokens_per_s_vs_full_interval")
    none = dict.fromkeys((*names, "decode_change_at_budget_pct", "ttft_s_at_budget"))
    if not cap:
        return none
    tokens_per_s = cap["sessions"] / (cap["decode_ms_p50"] / 1e3) if cap["sessions"] else 0.0
    figures = {**none, "tokens_per_s_at_budget": tokens_per_s, "ttft_s_at_budget": cap.get("ttft_s")}
    if not (cap_full and cap_full["sessions"]):
        return figures
    figures["sessions_vs_full"] = cap["sessions"] / cap_full["sessions"]
    if not cap["sessions"]:
        return {**figures, "tokens_per_s_vs_full": 0.0, "tokens_per_s_vs_full_interval": (0.0, 0.0)}
    change = _decode_change(cap, cap_full)
    if change is None:
        return figures
    per_step, low, high = (1 + x / 100 for x in change)  # the strategy's step over full's, with its interval
    sessions = figures["sessions_vs_full"]
    return {
        **figures,
        "tokens_per_s_vs_full": sessions / per_step,
        "tokens_per_s_vs_full_interval": (sessions / high, sessions / low),
        "decode_change_at_budget_pct": change[0],
    }


def _output_length(mine: dict | None, full: dict | None) -> dict:
    """Mean output tokens of a strategy's free answers, and their change against `full`'s on the same prompts (ratio
    of means, paired bootstrap interval), with the share that ran to the cap (a capped answer's length is a floor)."""
    figures = dict.fromkeys(("output_tokens", "output_change_pct", "output_change_interval", "output_capped"))
    if not mine:
        return figures
    tokens = mine["output_tokens"]
    figures |= {"output_tokens": statistics.fmean(tokens), "output_capped": statistics.fmean(mine["capped"])}
    if full and len(full["output_tokens"]) == len(tokens) and sum(full["output_tokens"]):
        ratio, low, high = paired_mean_ratio_interval(full["output_tokens"], tokens)
        figures |= {
            "output_change_pct": 100 * (ratio - 1),
            "output_change_interval": (100 * (low - 1), 100 * (high - 1)),
        }
    return figures


def _top1_interval(record: dict | None) -> tuple[float, float] | None:
    if not record or record.get("top1") is None:
        return None
    return proportion_interval(round(record["top1"] * record["steps"]), record["steps"])


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
