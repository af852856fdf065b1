"""A run's cells and their content-addressed ids: what resume, retries, widened grids and the report go by."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .. import __version__
from . import reference_text
from .config import ReportConfig
from .tasks import depths

# The settings each kind of cell reads, beside the model and dtypes every cell reads: a cell's id hashes these and
# nothing else, so changing a guardrail or the at-scale column reruns nothing, and changing decode steps reruns
# only latency cells.
COMMON_SETTINGS = ("model", "device", "kv_dtype", "compute_dtype", "weights")
CELL_SETTINGS = {
    "recall": ("max_new_tokens", "prefill_chunk"),
    "latency": ("decode_steps",),
    "capacity": ("decode_steps", "kv_budget"),
    "output": ("outputs", "output_cap", "prefill_chunk", "fidelity_text"),
    "fidelity": ("fidelity_windows", "fidelity_prefill", "fidelity_steps", "fidelity_text"),
}


def latency_warmup(decode_steps: int) -> int:
    """Decode steps a latency cell runs before the `decode_steps` it times (a compiled step captures in them)."""
    return min(4, decode_steps // 4)


def cell_id(config: ReportConfig, cell: dict) -> str:
    """A hash of everything that determines the cell's result (model, dtypes, weights, strategy, task, length,
    depth, seed, the harness settings it reads, the package version): resume, retries and widened grids go by it."""
    settings = {name: getattr(config, name) for name in COMMON_SETTINGS + CELL_SETTINGS[cell["kind"]]}
    if cell["kind"] == "recall" and config.recall_batch != 1:  # batch-mates shift the numerics a little; runs from
        settings["recall_batch"] = config.recall_batch  # before batching (one at a time) keep their ids
    if cell["kind"] == "recall" and config.cases != 1:  # likewise for cases of the first generators
        settings["cases"] = config.cases
    if cell["kind"] == "latency" and config.compile:  # compiled steps time differently from eager ones
        settings["compile"] = True
    if cell["kind"] in ("fidelity", "output"):  # the text, not where it lies (the shipped one when none is given)
        text = Path(config.fidelity_text).read_bytes() if config.fidelity_text else reference_text().encode()
        settings["fidelity_text"] = hashlib.sha256(text).hexdigest()
    cell = {k: v for k, v in cell.items() if k not in ("id", "model")}
    payload = json.dumps({"cell": cell, "settings": settings, "kvcompress": __version__}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def turn_keys(config: ReportConfig, question: str) -> list[dict]:
    """What tells a recall cell's questions apart: nothing for one question per case; with follow-ups, every
    question's index in every mode the placement runs (a cell's id then holds how many questions its case asks)."""
    if config.followups == 1:
        return [{}]
    return [
        {"turns": config.followups, "mode": mode, "turn": turn}
        for mode in config.modes_for(question)
        for turn in range(config.followups)
    ]


def _timed(config: ReportConfig, kind: str, rounds: int) -> list[dict]:
    """Timed cells of one kind at every latency length, every strategy's round r before any round r + 1."""
    return [
        {"kind": kind, "strategy": s, "length": length, **({"round": r} if r else {})}
        for length in config.latency_lengths
        for r in range(rounds)
        for s in config.strategies
    ]


def cell_keys(config: ReportConfig) -> list[dict]:
    """Every cell of a run, each with its id, in the order it runs: recall case by case (strategies, then their
    questions, innermost, so one prefill of a batch's contexts serves them all), then latency round by round, then
    capacity (with a KV budget) round by round, then fidelity, then output length (with `outputs`)."""
    cells = [
        {
            "kind": "recall",
            "strategy": strategy,
            "task": task,
            "length": length,
            "depth": depth,
            "seed": seed,
            "question": question,
            **turn,
        }
        for task in config.tasks
        for length in config.lengths
        for depth in depths(config.depths)
        for seed in range(config.seeds)
        for question in config.questions
        for strategy in config.strategies
        for turn in turn_keys(config, question)
    ]
    # every strategy's round r before any round r + 1, so drift of the machine lands in every strategy's rounds alike;
    # round 0 has no key, so the cells of runs from before rounds keep their ids
    cells += _timed(config, "latency", config.latency_rounds)
    cells += _timed(config, "capacity", config.capacity_rounds) if config.kv_budget is not None else []
    cells += [{"kind": "fidelity", "strategy": s} for s in config.strategies]
    if config.outputs:
        cells += [{"kind": "output", "strategy": s, "length": max(config.lengths)} for s in config.strategies]
    return [{"id": cell_id(config, cell), "model": config.model, **cell} for cell in cells]
