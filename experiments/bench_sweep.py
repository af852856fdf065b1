"""Sweep throughput: the same grid (experiments/sweep_ray_bench.yaml, 132 cells on the default model) on the `local`
backend (one process, every core) and on `ray` (N workers of one CPU each, a local Ray started by the run).
Writes results/sweep/{local,ray}/ (records and report of each run) and results/sweep/bench_sweep.{json,md}.

    python experiments/bench_sweep.py [--file experiments/sweep_ray_bench.yaml] [--workers 2] [--out results/sweep]

Wall time is the whole command as a user waits for it: model loads, Ray's start and stop, every cell, the report.
Per-cell overhead is the time workers were not inside a cell, spread over the cells:
(workers x cell phase - sum of cell times) / cells, the cell phase running from the first cell handed out to the
last record written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from kvcompress.evals.backends import Backend
from kvcompress.evals.records import RecordStore
from kvcompress.evals.run import run_report
from kvcompress.evals.sweep import load_sweep

from kvcompress.provenance import provenance, provenance_lines


def timed_run(configs, out: Path, backend: Backend, command: list[str]) -> dict:
    written: list[float] = []
    original = RecordStore.append

    def append(self, record):
        original(self, record)
        written.append(time.perf_counter())

    RecordStore.append = append
    started = time.perf_counter()
    try:
        run_report(configs, out, command=command, backend=backend)
    finally:
        RecordStore.append = original
    wall = time.perf_counter() - started
    records = RecordStore(out / "records.jsonl").records
    cell_s = [r["cell_s"] for r in records]
    first_cell_done = written[0] - cell_s[0]  # the first cell was handed out this long before its record came back
    phase = written[-1] - first_cell_done
    workers = backend.workers or 1
    return {
        "backend": backend.record(),
        "cells": len(records),
        "wall_s": round(wall, 2),
        "startup_s": round(first_cell_done - started, 2),
        "cell_phase_s": round(phase, 2),
        "cells_per_min": round(60 * len(records) / wall, 2),
        "sum_cell_s": round(sum(cell_s), 2),
        "mean_cell_s": round(sum(cell_s) / len(records), 4),
        "overhead_per_cell_s": round((workers * phase - sum(cell_s)) / len(records), 4),
        "recall": {r["id"]: r["correct"] for r in records if r["kind"] == "recall" and r["outcome"] == "ok"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", default="experiments/sweep_ray_bench.yaml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="results/sweep")
    args = parser.parse_args()
    command = ["python", "experiments/bench_sweep.py", *sys.argv[1:]]
    configs, _ = load_sweep(args.file)
    out = Path(args.out)
    local = timed_run(configs, out / "local", Backend(), command)
    ray = timed_run(configs, out / "ray", Backend("ray", workers=args.workers), command)
    same_cells = sorted(local["recall"]) == sorted(ray["recall"])
    differing = sum(local["recall"][k] != ray["recall"].get(k) for k in local["recall"])
    meta = {
        **provenance(configs[0].model, "cpu", command),
        "torch_threads_local": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "file": args.file,
    }
    result = {
        "meta": meta,
        "local": {k: v for k, v in local.items() if k != "recall"},
        "ray": {k: v for k, v in ray.items() if k != "recall"},
        "throughput_ratio": round(ray["cells_per_min"] / local["cells_per_min"], 3),
        "cell_phase_ratio": round(local["cell_phase_s"] / ray["cell_phase_s"], 3),
        "same_cell_ids": same_cells,
        "recall_cells": len(local["recall"]),
        "recall_outcomes_differing": differing,
    }
    (out / "bench_sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = [("backend", "cells", "wall s", "startup s", "cell phase s", "cells/min", "mean cell s", "overhead/cell s")]
    for name, r in (
        (f"local (1 process, {torch.get_num_threads()} threads)", local),
        (f"ray ({args.workers} workers x 1 CPU)", ray),
    ):
        rows.append(
            (
                name,
                r["cells"],
                r["wall_s"],
                r["startup_s"],
                r["cell_phase_s"],
                r["cells_per_min"],
                r["mean_cell_s"],
                r["overhead_per_cell_s"],
            )
        )
    table = "\n".join(
        "| " + " | ".join(map(str, row)) + " |" + ("\n|" + "---|" * len(row) if i == 0 else "")
        for i, row in enumerate(rows)
    )
    md = [
        "# Sweep throughput: local vs Ray",
        "",
        *provenance_lines(meta),
        f"- grid: `{args.file}` ({local['cells']} cells); records and reports in local/ and ray/",
        "",
        table,
        "",
        f"Ray / local throughput over the whole command: **{result['throughput_ratio']:.2f}x**; over the cell phase "
        f"alone: {result['cell_phase_ratio']:.2f}x. Same cell ids on both: {same_cells}; recall outcomes that "
        f"differ: {differing} of {len(local['recall'])}.",
        "",
    ]
    (out / "bench_sweep.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
