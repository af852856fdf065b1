"""The pressure-transfer report from a run's records: summary.csv, summary.json, pressure_transfer.md and the plots.
summary.py turns records into rows (rows.py's ReportRow), verdicts.py judges them, render.py writes them as text."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .config import configs_of
from .followups import first_questions, followup_section, recall_by_turn
from .plots import plot_all
from .records import RecordStore
from .render import by_task, header_lines, table
from .summary import grid_records, summarize


def write_report(out: Path) -> Path:
    """summary.csv, pressure_transfer.md and the plots from out/records.jsonl (a section per model when the run
    swept several); returns the table's path."""
    out = Path(out)
    store = RecordStore(out / "records.jsonl")
    meta, configs = store.meta, configs_of(store.meta)
    grids = [(c, grid_records(store.records, c)) for c in configs]
    # the main table reads each case's first question; follow-ups get a section of their own
    sections = [(c, firsts, summarize(firsts, c)) for c, records in grids for firsts in [first_questions(records, c)]]
    rows = [row for _, _, mine in sections for row in mine]
    summary = [row.as_dict() for row in rows]  # summary.json and summary.csv hold the same fields
    config = configs[0]
    with (out / "summary.csv").open("w", newline="") as f:
        # every row names the run that produced it, so a copied CSV keeps its provenance
        writer = csv.DictWriter(f, fieldnames=[*summary[0], "command", "device", "git_commit"])
        writer.writeheader()
        writer.writerows({**r, **{k: meta[k] for k in ("command", "device", "git_commit")}} for r in summary)
    header = header_lines(meta, config, rows, store.records)
    path = out / "pressure_transfer.md"
    # CommonMark needs a blank line between the list and the table, or the table is swallowed by the last item
    body = (
        table(rows, config)
        if len(configs) == 1
        else "\n".join(f"## {c.model}\n\n{table(mine, c)}" for c, _, mine in sections)
    )
    followups = "".join(followup_section(records, c) for c, records in grids)
    path.write_text("\n".join(header) + "\n" + body + by_task(sections) + followups)
    (out / "summary.json").write_text(json.dumps({"meta": meta, "rows": summary}, indent=1) + "\n")
    for (c, records, mine), (_, every) in zip(sections, grids):  # several models: each model's plots in its folder
        folder = (
            out if len(configs) == 1 else out / "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in c.model)
        )
        folder.mkdir(exist_ok=True)
        plot_all(records, mine, c, folder, recall_by_turn(every, c))
    return path
