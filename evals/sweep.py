"""Sweeps: a YAML file names the models, the strategies and the parameter grids, and runs them through the report.

    models: [default, random:llama-3.1-8b]          # optional (default: the report's model)
    strategies: [int8, "sink+int8"]                  # varied by `grid`: each key is <member>.<parameter>
    grid: {sink.window: [128, 256, 512], int8.group: [0, 32]}
    sweep:                                           # and/or templates filled from their own grids
      - template: "window:window={window}"
        grid: {window: [128, 256, 512]}
    report: {tasks: [passkey], lengths: [512, 1024], depths: 5}
    out: results/sweeps/window

A `grid` key varies every listed strategy that has its member and leaves the others as they are, so the grid above
gives int8 at two group sizes and sink+int8 at six (window x group) points.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

from ..strategy import AXES, StrategySpec, _member_params, parse_strategy
from .config import ReportConfig

KEYS = ("models", "strategies", "grid", "sweep", "report", "out")


def _values(value) -> list:
    return value if isinstance(value, list) else [value]


def _templated(path, entries) -> list[str]:
    strategies = []
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or "template" not in entry:
            raise ValueError(f"{path}: sweep entry {number} needs a 'template' (and optionally a 'grid')")
        grid = entry.get("grid") or {}
        names = list(grid)
        for values in itertools.product(*(_values(grid[n]) for n in names)):
            try:
                strategies.append(entry["template"].format(**dict(zip(names, values))))
            except KeyError as err:
                raise ValueError(
                    f"{path}: sweep entry {number} template uses {err} but its grid has no such key"
                ) from None
    return strategies


def _axis_of(path, key: str) -> tuple[str, str, str]:
    """'sink.window' -> ('retention', 'sink', 'window'), or an error naming what is allowed."""
    member, dot, parameter = key.partition(".")
    axis = next((a for a, registry in AXES.items() if member in registry), None)
    if not dot or axis is None:
        members = ", ".join(name for registry in AXES.values() for name in registry.names())
        raise ValueError(f"{path}: grid key {key!r} must be <member>.<parameter> with a member among {members}")
    fields = [f.name for f in dataclasses.fields(AXES[axis].get(member)) if f.init]
    if parameter not in fields:
        raise ValueError(
            f"{path}: grid key {key!r}: {member} has no parameter {parameter!r}; allowed: {', '.join(fields) or 'none'}"
        )
    return axis, member, parameter


def _varied(path, strategies: list[str], grid: dict) -> list[str]:
    """Each strategy at every point of the axis grid, varying only the members it has."""
    keys = {key: _axis_of(path, key) for key in grid}
    specs = []
    for strategy in strategies:
        try:
            specs.append(parse_strategy(strategy))
        except ValueError as err:
            raise ValueError(f"{path}: strategy {strategy!r}: {err}") from None
    unused = [
        key for key, (axis, member, _) in keys.items() if not any(getattr(spec, axis).name == member for spec in specs)
    ]
    if unused:
        raise ValueError(f"{path}: grid key(s) {', '.join(unused)} vary none of the strategies {', '.join(strategies)}")
    out = []
    for spec in specs:
        mine = {key: k for key, k in keys.items() if getattr(spec, k[0]).name == k[1]}
        for values in itertools.product(*(_values(grid[key]) for key in mine)):
            members = {axis: getattr(spec, axis) for axis in AXES}
            for (axis, member, parameter), value in zip(mine.values(), values):
                members[axis] = AXES[axis].build(member, {**_member_params(members[axis]), parameter: value})
            out.append(str(StrategySpec(**members)))
    return out


def load_sweep(path: str | Path) -> tuple[list[ReportConfig], Path]:
    """The sweep's report settings, one ReportConfig per model (same strategies and cells), and its output folder."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; allowed: {', '.join(KEYS)}")
    if data.get("grid") and not data.get("strategies"):
        raise ValueError(f"{path}: 'grid' varies the listed 'strategies', and there are none")
    if not (data.get("sweep") or data.get("strategies")):
        raise ValueError(f"{path}: list 'strategies' (with an optional 'grid') or 'sweep' {{template, grid}} entries")
    strategies = ["full"]
    for strategy in _varied(path, _values(data.get("strategies") or []), data.get("grid") or {}) + _templated(
        path, data.get("sweep") or []
    ):
        strategy = str(parse_strategy(strategy))  # canonical, so two spellings of one strategy run once
        if strategy not in strategies:
            strategies.append(strategy)
    report = data.get("report") or {}
    models = _values(data.get("models") or report.get("model") or ReportConfig.default("model"))
    if len(set(models)) != len(models):
        raise ValueError(f"{path}: 'models' lists a model twice: {models}")
    configs = [ReportConfig.from_dict({**report, "model": model, "strategies": strategies}) for model in models]
    return configs, Path(data.get("out") or Path("results/sweeps") / Path(path).stem)
