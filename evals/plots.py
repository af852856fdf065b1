"""PNG plots of a report: the HBM/recall Pareto, recall heatmaps (depth x length) and decode latency vs context."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .config import ReportConfig
from .latency import latency_cells
from .rows import ReportRow


def plot_all(
    records: list[dict],
    rows: list[ReportRow],
    config: ReportConfig,
    out: Path,
    by_turn: dict[tuple, list[float | None]] | None = None,
) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional: the table and CSV carry every number
        return []
    paths = [_pareto(plt, rows, out), _heatmaps(plt, records, config, out), _latency(plt, records, config, out)]
    paths.append(_by_turn(plt, by_turn, out) if by_turn else None)
    return [p for p in paths if p]


def _pareto(plt, rows: list[ReportRow], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    labels_at: dict[tuple, int] = defaultdict(int)  # strategies that land on the same spot (int8 and fp8 often do)
    for r in rows:
        if r.hbm_saved_pct is None or r.recall_loss_pts is None:
            continue
        size = 40 + 4 * max(0.0, 100 + (r.decode_change_pct or 0))
        point = (r.hbm_saved_pct, r.recall_loss_pts)
        ax.scatter(*point, s=size, alpha=0.6)
        spot = (round(point[0] / 3), round(point[1] / 3))  # within ~3 units the labels would overprint: stack them
        ax.annotate(r.label, point, fontsize=8, xytext=(4, 4 + 10 * labels_at[spot]), textcoords="offset points")
        labels_at[spot] += 1
    ax.margins(x=0.15, y=0.12)  # room for the labels of the outermost points
    return _finish(
        plt,
        fig,
        ax,
        "HBM saved (% of full KV, measured)",
        "recall loss (points vs full)",
        "Pressure transfer: HBM relieved vs recall lost\n(marker area grows with decode latency)",
        out / "pareto.png",
    )


def _finish(plt, fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _heatmaps(plt, records, config, out: Path) -> Path:
    # lm-eval's own tasks (RULER) name no depth: no cell of this grid
    recall = [r for r in records if r["kind"] == "recall" and r.get("outcome") == "ok" and r.get("depth") is not None]
    depths = sorted({r["depth"] for r in recall})
    lengths = sorted({r["length"] for r in recall})
    if not depths or not lengths:
        return None
    strategies = config.strategies
    fig, axes = plt.subplots(1, len(strategies), figsize=(2.2 * len(strategies) + 1, 3.2), squeeze=False)
    for ax, strategy in zip(axes[0], strategies):
        cells = defaultdict(list)
        for r in recall:
            if r["strategy"] == strategy:
                cells[(r["depth"], r["length"])].append(r["correct"])
        grid = [
            [(sum(cells[(d, n)]) / len(cells[(d, n)])) if cells[(d, n)] else float("nan") for n in lengths]
            for d in depths
        ]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_title(strategy, fontsize=7)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths] if ax is axes[0][0] else [], fontsize=7)
        ax.set_xlabel("context tokens", fontsize=7)
    axes[0][0].set_ylabel("needle depth", fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="recall")
    path = out / "recall_heatmap.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _latency(plt, records, config, out: Path) -> Path:
    latency = latency_cells(records)
    if not latency:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for strategy in config.strategies:
        points = sorted((length, r["decode_ms_p50"]) for (name, length), r in latency.items() if name == strategy)
        if points:
            ax.plot(*zip(*points), marker="o", label=strategy)
    ax.legend(fontsize=7)
    return _finish(
        plt,
        fig,
        ax,
        "context tokens",
        "decode ms/token (p50)",
        "Decode latency vs context",
        out / "latency_vs_context.png",
    )


def _by_turn(plt, by_turn: dict[tuple, list[float | None]], out: Path) -> Path:
    """Recall at each question index of a follow-up run, a line per strategy, placement and mode."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for (strategy, question, mode), recall in sorted(by_turn.items()):
        points = [(i + 1, 100 * r) for i, r in enumerate(recall) if r is not None]
        ax.plot(*zip(*points), marker="o", label=f"{strategy} [{question}, {mode}]")
    ax.legend(fontsize=6)
    return _finish(plt, fig, ax, "question index", "recall (%)", "Recall by question", out / "recall_by_question.png")
