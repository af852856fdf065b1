"""The words around a row's figures: the pressure a strategy relieves and the one it creates, its guardrail verdict
(each guardrail judged on its 95% interval) and when to roll it back to `full`."""

from __future__ import annotations

from ..strategy import StrategySpec
from . import stats
from .config import Thresholds
from .rows import GB, Figures, ReportRow
from .stats import FAIL, INCONCLUSIVE


def _judged(
    name: str, value: float, interval, limit: float, higher_is_better: bool, text: str, unit: str = ""
) -> tuple[str, str]:
    """(verdict, words) of one guardrail, judged on the interval (a point is its own interval)."""
    low, high = interval or (value, value)
    shown = text.format(value) + unit + (f" (95% CI {text.format(low)} to {text.format(high)})" if low != high else "")
    bound = (">= " if higher_is_better else "<= ") + text.format(limit) + unit
    return stats.verdict(low, high, limit, higher_is_better), f"{name} {shown} vs {bound}"


def pressures(figures: Figures, spec: StrategySpec, t: Thresholds) -> ReportRow:
    """The report row of these figures: relieved and created pressure, guardrail verdict and rollback, in words."""
    baseline = figures.strategy == "full"
    relieved = []
    if figures.hbm_saved_pct is not None and figures.hbm_saved_pct > 0.5:
        relieved.append(f"HBM -{figures.hbm_saved_pct:.1f}% of KV")
    if figures.sessions_vs_full is not None and figures.sessions_vs_full > 1:
        relieved.append(
            f"{figures.sessions_vs_full:.2f}x the sessions at the KV budget"
            + (f", {figures.tokens_per_s_vs_full:.2f}x tokens/s" if figures.tokens_per_s_vs_full is not None else "")
        )
    created = []
    retention = spec.retention
    if retention.evicts:
        kept = (
            f"tokens outside each head's top {retention.budget or f'{retention.ratio:.0%}'} by score are gone"
            if retention.seam
            else f"tokens older than the {retention.capacity(0)}-token budget are gone"
        )
        created.append(
            f"recall: {kept}" + (f" (-{figures.recall_loss_pts:.1f} pts measured)" if figures.recall_loss_pts else "")
        )
    elif figures.recall_loss_pts and figures.recall_loss_pts > 0:
        created.append(f"recall -{figures.recall_loss_pts:.1f} pts")
    if not spec.codec.lossless and figures.top1 is not None:
        created.append(f"fidelity: top-1 {figures.top1:.1%}, KL {figures.kl:.1e}")
    if figures.decode_change_pct is not None and figures.decode_change_pct > 1:
        created.append(f"decode latency +{figures.decode_change_pct:.0f}%")
    if figures.decode_change_at_budget_pct is not None and figures.decode_change_at_budget_pct > 1:
        created.append(
            f"decode per session at the KV budget +{figures.decode_change_at_budget_pct:.0f}% "
            f"({figures.sessions_at_budget} sessions in a batch)"
        )
    if figures.output_change_interval is not None and figures.output_change_interval[0] > 0:
        created.append(
            f"answers {figures.output_change_pct:+.0f}% longer than full's (end-to-end time per answer grows with them)"
        )
    if figures.host_bytes or figures.disk_bytes:
        held = (("host", figures.host_bytes), ("disk", figures.disk_bytes))
        where = " + ".join(f"{name} {nbytes / GB:.3f} GB" for name, nbytes in held if nbytes)
        created.append(
            f"{where} holding KV"
            + (
                f"; {figures.moved_bytes_per_step / 1e6:.1f} MB moved per decode step"
                if figures.moved_bytes_per_step
                else ""
            )
        )
    # a guardrail fails only when its whole 95% interval is on the wrong side, passes only when the whole of it is
    # on the right side, and is inconclusive (n too small) otherwise
    judged = []
    if figures.recall_loss_pts is not None:
        judged.append(
            _judged(
                "recall loss",
                figures.recall_loss_pts,
                figures.recall_loss_interval,
                t.recall_loss_pts,
                False,
                "{:.1f}",
                " pts",
            )
        )
    if figures.decode_change_pct is not None:
        judged.append(
            _judged(
                "decode",
                figures.decode_change_pct,
                figures.decode_change_interval,
                t.decode_latency_pct,
                False,
                "{:+.0f}",
                "%",
            )
        )
    if figures.top1 is not None:
        judged.append(_judged("top-1", figures.top1, figures.top1_interval, t.top1, True, "{:.1%}"))
    failures = [words for outcome, words in judged if outcome == FAIL]
    unsure = [words for outcome, words in judged if outcome == INCONCLUSIVE]
    if figures.allocation_failures:
        failures.append(f"{figures.allocation_failures} allocation failures")
    measured = ("decode_change_pct", "hbm_saved_pct") + (() if figures.skipped else ("recall_loss_pts", "top1"))
    missing = [name for name in measured if getattr(figures, name) is None]
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
    if figures.cell_errors and not baseline:
        verdict = f"incomplete: {figures.cell_errors} cells lost with their worker (--resume reruns them); " + verdict
    if figures.skipped:
        verdict += f" (memory and latency only: {figures.skipped})"
    return ReportRow(
        **vars(figures),
        relieved="; ".join(relieved) or "-",
        created="; ".join(created) or "-",
        verdict=verdict,
        rollback="-" if baseline else rollback,
        complete=complete,
    )
