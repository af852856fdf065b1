"""What a `kvcompress lm-eval --strategies` run will cost before it starts: the documents of its tasks and the estimate
it prints (model work per strategy, then the table's fidelity cells)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from ..models import default_model_dir
from .backends import Progress
from .cost import Calibration, cell_costs, documents_work, duration
from .lm_eval_args import _option
from .lm_eval_model import usable_device
from .lm_eval_recall import SHORT_ANSWER_TOKENS, _as_list, load_tokenizer, recall_docs, recall_settings, task_manager
from .lm_eval_records import fidelity_left, table_config


def _estimate(
    names: list[str], runs: dict, argv: list[str], model_args: dict, calibration: dict, out: Path, workers: int = 1
) -> Progress:
    """Print the calibration, the grid (strategies x documents) and the estimated duration of the runs left and of
    the table's fidelity cells after them; return the bar over the runs."""
    timing = Calibration.from_record(calibration)
    docs = documents(argv, model_args)
    batch = _option(argv, "--batch_size") or "1"
    rows = int(batch) if batch.isdigit() else 1  # "auto": lm-eval sizes it; one row is the slowest case
    costs = {name: timing.seconds(documents_work(name, docs, rows)) for name in runs}
    config = table_config(
        names, model_args, usable_device(_option(argv, "--device")), max((p for p, _ in docs), default=1)
    )
    fidelity = cell_costs([(0, cell) for cell in fidelity_left(out, config)], [config], timing)
    found = f" ({len(names) - len(runs)} found, not rerun)" if len(runs) < len(names) else ""
    total = sum(costs.values())
    parallel = f", about {duration(max(*costs.values(), total / workers))} on {workers} workers" if workers > 1 else ""
    for line in (
        timing.line(),
        f"grid: {len(names)} strategies x {len(docs)} documents ({_option(argv, '--tasks')})",
        f"estimate: {len(runs)} strategy runs to run{found}, {duration(total)} of model work{parallel} (each run "
        f"also starts lm-eval), then {len(fidelity)} fidelity cells for the table, {duration(sum(fidelity.values()))}",
    ):
        print(line, file=sys.stderr)
    return Progress(costs, "kvcompress lm-eval", unit="strategies")


def documents(argv: list[str], model_args: dict[str, str]) -> list[tuple[int, int]]:
    """The documents of the run's --tasks (after --limit), each as (prompt tokens, generation budget in steps): ours
    from their metadata, any other task from lm-eval's own (its prompts tokenized)."""
    names = _as_list(_option(argv, "--tasks") or "")
    metadata = {**model_args, **json.loads(_option(argv, "--metadata") or "{}")}
    limit = _option(argv, "--limit")
    found = []
    for name in [n for n in names if n.startswith("kvc_")]:
        lengths, depth_count, seeds, tokenizer = recall_settings(metadata)
        docs = recall_docs(name.removeprefix("kvc_"), load_tokenizer(tokenizer), lengths, depth_count, seeds)
        budget = max(doc["answer_tokens"] for doc in docs) or SHORT_ANSWER_TOKENS
        found.append([(doc["prompt_tokens"], budget) for doc in docs])
    others = [n for n in names if not n.startswith("kvc_")]
    if others:  # lm-eval's tasks (RULER) load a tokenizer by name: `default` is the local directory it resolves to
        pretrained = model_args.get("pretrained", "default")
        name = model_args.get("tokenizer") or (str(default_model_dir()) if pretrained == "default" else pretrained)
        tokenizer = load_tokenizer(name)
        for task in task_manager(metadata={**metadata, "tokenizer": name}).load(others)["tasks"].values():
            budget = (task.config.generation_kwargs or {}).get("max_gen_toks", 256)
            generates = task.OUTPUT_TYPE == "generate_until"
            docs = []
            for doc in task.eval_docs:
                prompt = len(tokenizer(str(task.doc_to_text(doc))).input_ids)
                choices = 1 if task.OUTPUT_TYPE != "multiple_choice" else len(task.doc_to_choice(doc))
                docs += [(prompt, budget if generates else 0)] * choices
            found.append(docs)
    if limit is not None:  # as lm-eval reads it: a count of documents, or below 1 a share of them
        share = float(limit)
        found = [docs[: math.ceil(len(docs) * share) if share < 1 else int(share)] for docs in found]
    return [doc for docs in found for doc in docs]
