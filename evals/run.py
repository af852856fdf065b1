"""The run driver: every cell of a grid (one ReportConfig per model) started on a backend's workers, each record
appended to records.jsonl as it finishes, then the report (summary.csv, pressure_transfer.md, plots) from whatever
the records hold. The cells themselves run in harness.py's Harness, on the workers backends.py starts."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from ..provenance import provenance
from .backends import Backend, start
from .cases import CASES
from .cells import cell_keys
from .config import ReportConfig, check_budget, configs_of
from .cost import Calibration, cell_costs, grid_lines
from .records import RecordStore
from .report import write_report


def run_report(
    config: ReportConfig | list[ReportConfig] | None,
    out: Path,
    resume: bool = False,
    command: list[str] | None = None,
    backend: Backend | None = None,
) -> Path:
    """Run (or finish, with resume=True) every cell into out/records.jsonl, then write the report. `config` may list
    one ReportConfig per model (a sweep over models: same strategies and cells, rows grouped by model). Resuming with
    a config (a sweep file widened or narrowed) keeps every record whose cell is still in the grid and runs only the
    cells it lacks; resuming without one finishes the run as its records describe it. A records file holding no
    finished cell (a run that failed before its first) is started over."""
    out = Path(out)
    backend = backend or Backend()
    configs = [config] if isinstance(config, ReportConfig) else config
    store = None
    if resume:
        store = RecordStore(out / "records.jsonl")
        configs = configs or configs_of(store.meta)
    grid = {"config": dataclasses.asdict(configs[0]), "configs": [dataclasses.asdict(c) for c in configs]}
    if store is not None and {k: store.meta.get(k) for k in grid} != grid:
        store.replace_meta({**store.meta, **grid})
    jobs = [
        (index, cell)
        for index, c in enumerate(configs)
        for cell in cell_keys(c)
        if store is None or not store.has(cell)
    ]
    if not jobs:  # a resumed run with nothing left: no model loads, no worker starts; the report alone
        return write_report(out)
    stale = {configs[index].cases for index, cell in jobs if cell["kind"] == "recall"} - {CASES}
    if stale:
        raise ValueError(
            f"{out}: its recall records were made by version {min(stale)} of the case "
            f"generators and this kvcompress makes version {CASES} (other prompts), so its missing "
            "recall cells cannot be run to match them; run the grid into a new --out, or resume it "
            "with `kvcompress sweep FILE --resume` (which reruns every recall cell)"
        )
    for c in configs:
        check_budget(c)
    runner = start(backend, configs, jobs[0][0])  # a bad model or device fails here, before a records file exists
    try:
        calibration = Calibration.from_record(runner.calibrate())
        costs = cell_costs(jobs, configs, calibration)
        finished = sum(len(cell_keys(c)) for c in configs) - len(jobs)
        workers = runner.describe().get("workers", 1)
        for line in [calibration.line(), *grid_lines(configs, jobs, costs, finished, workers)]:
            print(line, file=sys.stderr)
        if store is None:
            meta = {
                **provenance(configs[0].model, None, command),
                **runner.describe(),
                **grid,
                "backend": backend.record(),
                "calibration": calibration.record(),
            }
            store = RecordStore(out / "records.jsonl", meta)
        per_worker = runner.run(jobs, store.append, costs)
    finally:
        runner.close()
    if backend.name == "ray":
        for name, s in sorted(per_worker.items()):
            print(f"  {name} ({s['where']}): {s['cells']} cells, busy {s['busy_s']:.1f} s", file=sys.stderr)
    return write_report(out)
