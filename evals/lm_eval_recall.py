"""Our recall tasks as lm-eval tasks (`kvc_passkey`, `kvc_multikey`, `kvc_vartrack`, `kvc_multiturn`, `kvc_ruler_*`):
the task class the YAML files in lm_eval_tasks/ name, its documents and metrics, and a TaskManager that finds them (with
lm-eval's task index parsed once per process for the same task files).
"""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
from transformers import AutoTokenizer

try:
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import TaskIndex
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(f"the lm-eval integration needs lm-eval: pip install -e '.[eval]' ({error})") from None

from ..models import _pretrained_source
from ..units import parse_token_list
from .cases import render, score
from .tasks import TASKS, make_case
from .tasks import depths as depth_grid

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
log = logging.getLogger(__name__)

_parse_index = TaskIndex.build
_INDEXES: dict[tuple, tuple] = {}  # (root, resolve_includes) -> (its YAML files' path, mtime and size; its entries)


def _indexed_once(paths, *, resolve_includes: bool = True) -> dict:
    """lm-eval's TaskIndex.build, each root parsed once per process for the same task files: every TaskManager (one
    per lm-eval run: each strategy's, each test's) would otherwise parse all of lm-eval's task YAML files again,
    seconds each time. A root is keyed on every YAML file's path, mtime and size under it, so an edited or added file
    has its root parsed anew. Roots merge in order, a later one's names over an earlier one's, as lm-eval's do; each
    caller gets its own dict of the (read-only) entries."""
    index: dict = {}
    for root in map(Path, paths):
        files = tuple((f, s.st_mtime_ns, s.st_size) for f in sorted(root.glob("**/*.yaml")) for s in [f.stat()])
        key = (root, resolve_includes)
        if key not in _INDEXES or _INDEXES[key][0] != files:
            _INDEXES[key] = files, _parse_index([root], resolve_includes=resolve_includes)
        for name, entry in _INDEXES[key][1].items():
            if name in index:
                log.warning(
                    "Task '%s' from %s overrides existing task from %s", name, entry.yaml_path, index[name].yaml_path
                )
            index[name] = entry
    return index


TaskIndex.build = staticmethod(_indexed_once)


def cell_metric(length: int, depth: float) -> str:
    return f"acc_L{length}_D{round(100 * depth)}"


def _as_list(value) -> list:
    if isinstance(value, str):
        return [v for v in value.replace(";", ",").split(",") if v.strip()]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def load_tokenizer(spec: str):
    if spec.startswith("random:"):
        raise ValueError(
            f"tokenizer {spec!r}: random models have no tokenizer; pass --metadata "
            '\'{"tokenizer": "default"}\' or an HF id'
        )
    source, kwargs = _pretrained_source(spec)
    return AutoTokenizer.from_pretrained(source, **kwargs)


def recall_docs(task: str, tokenizer, lengths: list[int], depth_count: int, seeds: int) -> list[dict]:
    """One lm-eval doc per (length, depth, seed) cell, the chat flattened to text (lm-eval's --apply_chat_template
    puts it in one user turn)."""
    docs = []
    for length in lengths:
        for depth in depth_grid(depth_count):
            for seed in range(seeds):
                case = make_case(task, tokenizer, length, depth, seed)
                if len(case.messages) == 1:
                    text = case.messages[0]["content"]
                else:
                    text = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in case.messages[:-1])
                    text += f"\nUser: {case.question}"
                docs.append(
                    {
                        "input": text,
                        "answer": case.answer,
                        "length": length,
                        "depth": depth,
                        "seed": seed,
                        "prompt_tokens": sum(map(len, render(tokenizer, case.messages, case.question))),
                        "answer_tokens": case.answer_tokens or 0,
                    }
                )
    return docs


SHORT_ANSWER_TOKENS = 16  # the generation budget of tasks whose answers are a few digits (they stop at a newline)


def recall_settings(meta: dict) -> tuple[list[int], int, int, str]:
    """A kvc_* task's lengths, depth count, seeds and tokenizer spec from its metadata, defaults filled in."""
    lengths = parse_token_list(_as_list(meta.get("lengths", [512, 1024])), "metadata lengths")
    tokenizer = str(meta.get("tokenizer") or meta.get("pretrained") or "default")
    return lengths, int(meta.get("depths", 5)), int(meta.get("seeds", 1)), tokenizer


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    correct = float(score(doc["answer"], results[0]))
    return {"acc": correct, cell_metric(doc["length"], doc["depth"]): correct}


class KVCTask(ConfigurableTask):
    """A recall task whose cells come from metadata: lengths (tokens, chat template included), depths (how many,
    spread over [0, 1]), seeds, tokenizer (default: the model's `pretrained`). Metrics: `acc` and one
    `acc_L{length}_D{depth %}` per cell, so a heatmap can be drawn from lm-eval's results alone."""

    def __init__(self, config: dict | None = None, **kwargs):
        config = dict(config or {})
        meta = dict(config.get("metadata") or {})
        task = config["task"].removeprefix("kvc_")
        if task not in TASKS:
            raise ValueError(
                f"unknown kvcompress task {config['task']!r}; allowed: " + ", ".join(f"kvc_{t}" for t in TASKS)
            )
        lengths, depth_count, seeds, tokenizer_spec = recall_settings(meta)
        metrics = ["acc"] + [cell_metric(length, d) for length in lengths for d in depth_grid(depth_count)]
        docs = recall_docs(task, load_tokenizer(tokenizer_spec), lengths, depth_count, seeds)
        # answers of 5-7 digits: a short budget and a newline stop keep a CPU run quick; RULER's answers are lists (up
        # to 10 words, 4 uuids) that may span lines: no stop, and the budget the report gives the task's cases
        budget = max(doc["answer_tokens"] for doc in docs)
        config.update(
            output_type="generate_until",
            test_split="test",
            doc_to_text="{{input}}",
            doc_to_target="{{answer}}",
            custom_dataset=lambda **_: {"test": datasets.Dataset.from_list(docs)},
            process_results=process_results,
            metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics],
            generation_kwargs=(
                {"until": [], "max_gen_toks": budget, "do_sample": False}
                if budget
                else {"until": ["\n"], "max_gen_toks": SHORT_ANSWER_TOKENS, "do_sample": False}
            ),
        )
        config.pop("class", None)
        super().__init__(config=config, **kwargs)


def task_manager(include_path: str | Path | list | None = None, **kwargs) -> TaskManager:
    """A TaskManager that knows our tasks beside lm-eval's and `include_path`'s, for `simple_evaluate(...,
    task_manager=kvcompress.lm_eval.task_manager())`."""
    paths = (
        []
        if include_path is None
        else list(include_path)
        if isinstance(include_path, (list, tuple))
        else [include_path]
    )
    return TaskManager(include_path=[*paths, str(TASKS_DIR)], **kwargs)
