"""Sweeps: a YAML file expands template strategies over parameter grids and runs them through the report.

    sweep:
      - template: "window:window={window}"
        grid: {window: [128, 256, 512]}
    report: {tasks: [passkey], lengths: [512, 1024], depths: 5}
    out: results/sweeps/window
"""

from __future__ import annotations

import itertools
from pathlib import Path

from .config import ReportConfig


def load_sweep(path: str | Path) -> tuple[ReportConfig, Path]:
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    unknown = sorted(set(data) - {"sweep", "report", "out"})
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; allowed: sweep, report, out")
    if not data.get("sweep"):
        raise ValueError(f"{path}: 'sweep' must list at least one {{template, grid}} entry")
    strategies = ["full"]
    for number, entry in enumerate(data["sweep"], 1):
        if not isinstance(entry, dict) or "template" not in entry:
            raise ValueError(f"{path}: sweep entry {number} needs a 'template' (and optionally a 'grid')")
        grid = entry.get("grid") or {}
        names = list(grid)
        for values in itertools.product(*(grid[n] if isinstance(grid[n], list) else [grid[n]] for n in names)):
            try:
                strategy = entry["template"].format(**dict(zip(names, values)))
            except KeyError as err:
                raise ValueError(f"{path}: sweep entry {number} template uses {err} but its grid has no such key") from None
            if strategy not in strategies:
                strategies.append(strategy)
    config = ReportConfig.from_dict({**(data.get("report") or {}), "strategies": strategies})
    return config, Path(data.get("out") or Path("results/sweeps") / Path(path).stem)
