"""lm-eval's outputs as ours: each strategy's run folder (samples, request records) as records of the harness's
schema, and the pressure-transfer table over them with the report's fidelity cells."""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from pathlib import Path

from ..dtypes import dtype_name, plan_dtypes
from ..geometry import config_dtype
from ..models import load_config
from ..strategy import parse_strategy
from .cells import cell_keys
from .config import ReportConfig
from .harness import Harness
from .lm_eval_args import _model_args
from .lm_eval_model import REQUESTS_FILE
from .records import FORMAT, RecordStore
from .report import write_report


def _slug(strategy: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in strategy)


def _results_file(folder: Path) -> Path | None:
    found = sorted(folder.glob("**/results_*.json"))
    return found[-1] if found else None


def _samples(folder: Path) -> dict[str, list[dict]]:
    """lm-eval's per-document samples (--log_samples) of a run, by task: the newest file of each task."""
    newest: dict[str, Path] = {}
    for path in sorted(folder.glob("**/samples_*.jsonl")):
        newest[path.name.removeprefix("samples_").rsplit("_", 1)[0]] = path
    return {
        task: [
            sample
            for line in path.read_text().splitlines()
            if line.strip()
            if (sample := json.loads(line)).get("kind") != "meta"
        ]
        for task, path in newest.items()
    }


def _document_correct(sample: dict) -> bool:
    """A document is recalled when its score is whole: our tasks' `acc`, or the first metric (RULER scores the share
    of expected answers found; all of them counts, as in the report)."""
    names = sample.get("metrics") or [k for k in ("acc", "exact_match") if k in sample]
    value = sample.get("acc", sample.get(names[0])) if names else None
    if not isinstance(value, (int, float)):
        raise ValueError(f"lm-eval sample of doc {sample.get('doc_id')} has no numeric metric to score recall by")
    return value >= 1.0


def _requests(folder: Path) -> list[dict]:
    """A run's request records (kvcompress_requests.jsonl), without its meta line."""
    return [
        r
        for line in (folder / REQUESTS_FILE).read_text().splitlines()
        if line.strip()
        if (r := json.loads(line))["kind"] != "meta"
    ]


def run_records(folder: Path, strategy: str, length: int, requests: list[dict]) -> list[dict]:
    """One strategy's lm-eval run as records of the harness's schema: a recall record per document (paired with
    `full`'s by task and document) and one latency record from its requests (decode ms/token of each request, its
    spread judged like a report's steps; TTFT; resident KV bytes per tier, means over the requests)."""
    samples_by_task = _samples(folder)
    if not samples_by_task:
        raise ValueError(
            f"{folder} holds lm-eval results without per-document samples (a run from before "
            f"--log_samples was added): remove the folder to rerun that strategy"
        )
    records = []
    for task, samples in samples_by_task.items():
        for sample in samples:
            doc = sample.get("doc") or {}
            records.append(
                {
                    "kind": "recall",
                    "strategy": strategy,
                    "task": task,
                    "doc_id": sample["doc_id"],
                    "length": doc.get("length") or doc.get("max_length") or length,
                    "depth": doc.get("depth"),
                    "seed": doc.get("seed", 0),
                    "question": "inside",
                    "outcome": "ok",
                    "correct": _document_correct(sample),
                    "answer": sample.get("target"),
                }
            )
    timed = [r for r in requests if r["kind"] == "generate_until"] or requests  # multiple choice: scoring steps
    decode = [r["decode_ms_per_token"] for r in timed if r.get("decode_ms_per_token") is not None]
    tiers = {tier for r in timed for tier in r["kv_bytes"]}
    records.append(
        {
            "kind": "latency",
            "strategy": strategy,
            "length": length,
            "outcome": "ok",
            "requests": len(timed),
            "decode_ms": decode,
            "decode_ms_p50": statistics.median(decode) if decode else None,
            "ttft_s": statistics.fmean([r["ttft_s"] for r in timed if r.get("ttft_s") is not None] or [0.0]),
            "kv_bytes_final": {tier: statistics.fmean(r["kv_bytes"].get(tier, 0) for r in timed) for tier in tiers},
        }
    )
    return records


def table_config(strategies: list[str], model_args: dict[str, str], device: str, longest: int) -> ReportConfig:
    """The report settings of the table over lm-eval runs: its fidelity cells (their ids read no length) and the
    latency column at the longest request."""
    pretrained = model_args.get("pretrained", "default")
    return ReportConfig(
        model=pretrained,
        strategies=strategies,
        tasks=[],
        lengths=[longest],
        questions=["inside"],
        device=device,
        compute_dtype=model_args.get("dtype"),
        kv_dtype=model_args.get("kv_dtype") or dtype_name(config_dtype(load_config(pretrained))),
        weights=model_args.get("weights"),
        kv_budget=None,  # lm-eval's table has no capacity cells
    )


def fidelity_left(out: Path, config: ReportConfig) -> list[dict]:
    """The table's fidelity cells that out/records.jsonl does not hold yet (by id): the harness runs those."""
    path = out / "records.jsonl"
    kept = {r["id"] for r in (RecordStore(path).records if path.exists() else []) if r["kind"] == "fidelity"}
    return [c for c in cell_keys(config) if c["kind"] == "fidelity" and c["id"] not in kept]


def write_table(out: Path, strategies: list[str], model_args: str, meta: dict, device: str = "cpu") -> Path:
    """out/records.jsonl in the harness's schema from each strategy's lm-eval run (run_records), plus fidelity cells
    run by the harness with the report's settings (kept from the last records.jsonl while their ids match), then the
    report's own write_report: one table builder for both."""
    args = _model_args(model_args)
    folders = {name: out / _slug(name) for name in strategies}
    requests = {name: _requests(folder) for name, folder in folders.items()}
    longest = max(r.get("seen_tokens", 0) for mine in requests.values() for r in mine)
    config = table_config(strategies, args, device, longest)
    lm_records = [
        record
        for name, folder in folders.items()  # named as the report names them: canonical
        for record in run_records(folder, str(parse_strategy(name)), longest, requests[name])
    ]
    path = out / "records.jsonl"
    kept = {r["id"]: r for r in (RecordStore(path).records if path.exists() else []) if r["kind"] == "fidelity"}
    fidelity, harness = [], None
    for cell in (c for c in cell_keys(config) if c["kind"] == "fidelity"):
        if cell["id"] not in kept:
            harness = harness or Harness(config)
            print(
                f"kvcompress lm-eval: fidelity of {cell['strategy']} against the full cache, "
                f"{config.fidelity_windows} windows x {config.fidelity_steps} teacher-forced steps",
                file=sys.stderr,
            )
        fidelity.append(kept.get(cell["id"]) or harness.run(cell))
    tasks = sorted({r["task"] for r in lm_records if r["kind"] == "recall"})
    plan = plan_dtypes(config.kv_dtype, config.device, config.compute_dtype)
    meta = {
        **meta,
        **plan.as_record(),
        "weights": config.weights or dtype_name(plan.compute),
        "config": dataclasses.asdict(config),
        "lm_eval": {
            "tasks": tasks,
            "model_args": model_args,
            "runs": {name: str(folder) for name, folder in folders.items()},
        },
    }
    RecordStore.write(path, {"kind": "meta", "format": FORMAT, **meta}, [*lm_records, *fidelity])
    return write_report(out)
