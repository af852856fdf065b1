"""Follow-up questions in the report: recall on a case's first question and on the questions after it, per
strategy, placement and mode, each paired against `full` on the same cases and questions (`--followups K`).
The harness side lives in harness.py (`Harness._followups`), the cases' later questions in tasks.py and ruler.py."""

from __future__ import annotations

from .config import ReportConfig
from .stats import paired_recall


def first_questions(records: list[dict], config: ReportConfig) -> list[dict]:
    """The records the main table reads: every cell but the follow-ups' later questions, and a first question once
    (it is the same computation in every mode)."""
    first = {q: config.modes_for(q)[0] if config.followups > 1 else None for q in config.questions}
    return [
        r
        for r in records
        if r.get("kind") != "recall"
        or (r.get("turn", 0) == 0 and r.get("mode") == first.get(r.get("question", "after")))
    ]


def _key(record: dict) -> tuple:
    return (record["task"], record["length"], record["depth"], record["seed"], record.get("turn", 0))


def _paired(mine: list[dict], full: dict[tuple, bool]) -> str:
    pairs = [(full[_key(r)], r["correct"]) for r in mine if _key(r) in full]
    if not pairs:
        return "n/a"
    stats = paired_recall([f for f, _ in pairs], [c for _, c in pairs])
    pct = 100 * sum(c for _, c in pairs) / len(pairs)
    return f"{pct:.0f}% ({stats.loss_pts:+.1f} pts [{stats.low_pts:.1f}, {stats.high_pts:.1f}], n={stats.n})"


def followup_section(records: list[dict], config: ReportConfig) -> str:
    """A Markdown table: per strategy, placement and mode, recall on the first question and on the follow-ups with
    its loss against `full` (points, 95% interval, pairs), and recall at each question index."""
    if config.followups == 1:
        return ""
    recall = [r for r in records if r.get("kind") == "recall" and r.get("outcome") == "ok" and "turn" in r]
    turns = range(config.followups)
    lines = [
        "",
        f"## Follow-up questions ({config.followups} per case)",
        "",
        "Loss against `full` on the same cases and questions; the follow-ups' interval pools every later question "
        "of every case (questions of one case are not independent draws, so it is narrower than a per-case one).",
        "",
        "| strategy | question | mode | first question | follow-ups | " + " | ".join(f"q{t + 1}" for t in turns) + " |",
        "|---|---|---|---|---|" + "---|" * len(turns),
    ]
    for question in config.questions:
        for mode in config.modes_for(question):
            here = [r for r in recall if r.get("question", "after") == question and r["mode"] == mode]
            full = {_key(r): r["correct"] for r in here if r["strategy"] == "full"}
            for strategy in config.strategies:
                mine = [r for r in here if r["strategy"] == strategy]
                by_turn = [[r["correct"] for r in mine if r["turn"] == t] for t in turns]
                cells = [
                    f"`{strategy}`",
                    question,
                    mode,
                    _paired([r for r in mine if r["turn"] == 0], full),
                    _paired([r for r in mine if r["turn"] > 0], full),
                    *(f"{sum(o)}/{len(o)}" for o in by_turn),
                ]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def recall_by_turn(records: list[dict], config: ReportConfig) -> dict[tuple, list[float | None]]:
    """(strategy, placement, mode) -> recall at each question index, for the plot."""
    out = {}
    for r in (r for r in records if r.get("kind") == "recall" and r.get("outcome") == "ok" and "turn" in r):
        out.setdefault((r["strategy"], r.get("question", "after"), r["mode"]), [[] for _ in range(config.followups)])[
            r["turn"]
        ].append(r["correct"])
    return {key: [sum(o) / len(o) if o else None for o in turns] for key, turns in out.items()}
