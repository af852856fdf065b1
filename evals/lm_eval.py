"""lm-evaluation-harness glue: the model `kvcompress` (any `load_model` spec under any strategy) and the recall tasks
as lm-eval tasks (`kvc_passkey`, `kvc_multikey`, `kvc_vartrack`, `kvc_multiturn`).

lm-eval 0.4.13 finds a model only once its module is imported, so `kvcompress lm-eval ...` imports this module, adds
our task directory as lm-eval's --include_path, then hands the arguments to lm-eval's own CLI.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoTokenizer, LogitsProcessor, LogitsProcessorList

try:
    from lm_eval.api.registry import register_model
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(f"the lm-eval integration needs lm-eval: pip install -e '.[eval]' ({error})") from None

from ..cache import make_cache
from ..dtypes import dtype_name, plan_dtypes
from ..geometry import config_dtype
from ..models import _pretrained_source, default_model_dir, load_config, load_model
from ..provenance import provenance
from ..strategy import AXES, parse_strategy, split_strategies
from ..units import parse_token_list
from .backends import Backend, Progress, RayTasks
from .cases import render, score
from .cells import cell_keys
from .config import ReportConfig
from .cost import Calibration, calibrate_model, cell_costs, documents_work, duration
from .harness import Harness
from .records import FORMAT, RecordStore
from .report import write_report
from .tasks import TASKS, make_case
from .tasks import depths as depth_grid

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
REQUESTS_FILE = "kvcompress_requests.jsonl"
_STRATEGY_KEYS = {
    f.name
    for registry in AXES.values()
    for name in registry.names()
    for f in dataclasses.fields(registry.get(name))
    if f.init
}


# -- the model ---------------------------------------------------------------------------------------------------
def usable_device(device: str | None) -> str:
    """The device asked for, or the CPU where it is CUDA and there is none (lm-eval's CLI defaults to cuda:0)."""
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        return "cpu"
    return device or "cpu"


class _StepClock(LogitsProcessor):
    """Called once per generated token: time to the first one (TTFT) and between the next ones (decode)."""

    def __init__(self, device: torch.device):
        self.device, self.stamps = device, [time.perf_counter()]

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores

    def summary(self) -> dict[str, float | None]:
        gaps = [b - a for a, b in zip(self.stamps[1:], self.stamps[2:])]
        return {
            "ttft_s": self.stamps[1] - self.stamps[0] if len(self.stamps) > 1 else None,
            "decode_ms_per_token": 1e3 * sum(gaps) / len(gaps) if gaps else None,
        }


@register_model("kvcompress")
class KVCompressLM(HFLM):
    """lm-eval's HF model whose every request runs through a fresh kvcompress cache.

    generate_until goes through `generate(cache=...)`; log-likelihoods prefill the context into the cache and score
    the continuation token by token through it (lm-eval's HF model scores in one uncompressed forward). Per request it
    records resident KV bytes per tier, TTFT and decode ms/token, in `self.requests` and, with `requests_file`, one
    JSON line each.
    """

    def __init__(
        self,
        pretrained: str = "default",
        strategy: str = "full",
        dtype: str | None = None,
        kv_dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        requests_file: str | None = None,
        offload_dir: str | None = None,
        weights: str | None = None,
        tokenizer: str | None = None,
        **kwargs: Any,
    ):
        # tokenizer: read by lm-eval's synthetic tasks (RULER) to size their prompts; the model uses its own
        strategy_parts = [str(strategy)]
        for key in [k for k in kwargs if k in _STRATEGY_KEYS]:  # lm-eval split `strategy=sink:sinks=4,window=512`
            strategy_parts.append(f"{key}={kwargs.pop(key)}")
        self.spec = parse_strategy(",".join(strategy_parts))
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer for the kvcompress model, got {batch_size!r}")
        if usable_device(device) != (device or "cpu"):
            warnings.warn(f"device={device!r} but CUDA is not available: running on the CPU", stacklevel=2)
        model, tokenizer = load_model(
            pretrained, dtype=dtype, device=usable_device(device), kv_dtype=kv_dtype, weights=weights
        )
        if tokenizer is None:
            raise ValueError(f"pretrained={pretrained!r} has no tokenizer; lm-eval needs text in and out")
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=int(batch_size), **kwargs)
        self.pretrained, self.offload_dir = pretrained, offload_dir
        self.requests_file = Path(requests_file) if requests_file else None
        self.requests: list[dict] = []

    def _cache(self):
        return make_cache(self.model, self.spec, offload_dir=self.offload_dir)

    def _record(self, kind: str, cache, tokens: int, **timing: float | None) -> None:
        record = {
            "strategy": str(self.spec),
            "kind": kind,
            "seen_tokens": cache.get_seq_length(),
            "stored_tokens": cache.stored_tokens(),
            "kv_bytes": cache.kv_bytes(),
            "new_tokens": tokens,
            **timing,
        }
        self.requests.append(record)
        if self.requests_file is not None:
            self.requests_file.parent.mkdir(parents=True, exist_ok=True)
            with self.requests_file.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        clock = _StepClock(self.model.device)
        with self._cache() as cache:
            out = super()._model_generate(
                context,
                max_length,
                stop,
                cache=cache,
                logits_processor=LogitsProcessorList([clock]),
                **generation_kwargs,
            )
            self._record("generate_until", cache, out.shape[1] - context.shape[1], **clock.summary())
        return out

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        results = []
        for request, context_enc, continuation_enc in tqdm(
            requests, disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests"
        ):
            tokens = (context_enc + continuation_enc)[-(self.max_length + 1) :]
            count = min(len(continuation_enc), len(tokens) - 1)
            inputs, targets = tokens[:-1], torch.tensor(tokens[-count:], device=self.model.device)
            split = len(inputs) - count + 1  # the context, through the token that predicts the first target
            with self._cache() as cache:
                start = time.perf_counter()
                logits = [
                    self.model(input_ids=torch.tensor([inputs[:split]], device=self.model.device), cache=cache).logits[
                        0, -1:
                    ]
                ]
                prefilled = time.perf_counter()
                for token in inputs[split:]:
                    step = torch.tensor([[token]], device=self.model.device)
                    logits.append(self.model(input_ids=step, cache=cache).logits[0, -1:])
                logprobs = F.log_softmax(torch.cat(logits).to(self.softmax_dtype or torch.float32), dim=-1)
                answer = (
                    logprobs.gather(-1, targets[:, None]).sum().item(),
                    bool((logprobs.argmax(-1) == targets).all()),
                )
                steps = len(inputs) - split
                self._record(
                    "loglikelihood",
                    cache,
                    count,
                    ttft_s=prefilled - start,
                    decode_ms_per_token=1e3 * (time.perf_counter() - prefilled) / steps if steps else None,
                )
            results.append(answer)
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return results


# -- the tasks ---------------------------------------------------------------------------------------------------
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


# -- the CLI -----------------------------------------------------------------------------------------------------
def run_cli(argv: list[str]) -> None:
    """lm-eval's own CLI (same arguments, outputs and --help), with our model and tasks registered. A run of the
    kvcompress model with an output path records how it was made (command, model, device, versions, commit) as the
    first line of its request records and under "kvcompress" in lm-eval's results files."""
    from lm_eval.__main__ import cli_evaluate

    argv = _with_tokenizer(_with_our_tasks(_with_requests_file(argv)))
    out, model_args = _option(argv, "--output_path"), _model_args(_option(argv, "--model_args") or "")
    meta = None
    if _option(argv, "--model") == "kvcompress" and out is not None:
        meta = provenance(
            model_args.get("pretrained", "default"),
            usable_device(_option(argv, "--device")),
            ["kvcompress", "lm-eval", *argv],
        )
        requests = Path(model_args["requests_file"])
        requests.parent.mkdir(parents=True, exist_ok=True)
        with requests.open("a") as f:
            f.write(json.dumps({"kind": "meta", **meta}) + "\n")
    started, saved = time.time(), sys.argv
    sys.argv = ["lm-eval", *(_quote_strategy(argv) if _option(argv, "--model") == "kvcompress" else argv)]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    for path in Path(out).glob("**/results_*.json") if meta else []:
        if path.stat().st_mtime >= started:
            path.write_text(json.dumps({**json.loads(path.read_text()), "kvcompress": meta}, indent=2) + "\n")
    for path in Path(out).glob("**/samples_*.jsonl") if meta else []:  # per-document scores: a meta line first
        if path.stat().st_mtime >= started:
            path.write_text(json.dumps({"kind": "meta", **meta}) + "\n" + path.read_text())


_ARG_ITEM = re.compile(r"""(?:[^,"']|"[^"]*"|'[^']*')+""")  # a `key=value` between commas outside quotes


def _arg_items(text: str) -> list[str]:
    """--model_args split at its commas outside quotes, but for those between a strategy's parameters:
    `pretrained=default,strategy=sink:sinks=4,window=512+int8,dtype=float32`
    -> ['pretrained=default', 'strategy=sink:sinks=4,window=512+int8', 'dtype=float32']."""
    items: list[str] = []
    for item in _ARG_ITEM.findall(text):
        if items and item.partition("=")[0].strip() in _STRATEGY_KEYS and re.match(r"\s*strategy=[^\"']", items[-1]):
            items[-1] += "," + item
        else:
            items.append(item)
    return items


def _unquoted(value: str) -> str:
    value = value.strip()
    return value[1:-1] if len(value) > 1 and value[0] == value[-1] and value[0] in "\"'" else value


def _model_args(text: str) -> dict[str, str]:
    return {key.strip(): _unquoted(value) for key, eq, value in (i.partition("=") for i in _arg_items(text)) if eq}


def _quote_strategy(argv: list[str]) -> list[str]:
    """lm-eval's CLI splits --model_args at every comma outside quotes, so `strategy=sink:sinks=4,window=512` would
    reach it (and its log and results config) as `{'strategy': 'sink:sinks=4', 'window': '512'}`: quote the strategy."""

    def quoted(text: str) -> str:
        if text.lstrip().startswith("{"):  # JSON: lm-eval reads it whole
            return text
        return ",".join(
            f'strategy="{_unquoted(item.split("=", 1)[1])}"' if re.match(r"\s*strategy=.*,", item) else item
            for item in _arg_items(text)
        )

    rewritten, in_model_args = [], False
    for arg in argv:
        if arg.startswith("--model_args="):
            arg = "--model_args=" + quoted(arg.split("=", 1)[1])
        elif in_model_args and not arg.startswith("-"):  # --model_args takes one or more values
            arg = quoted(arg)
        in_model_args = arg == "--model_args" or (in_model_args and not arg.startswith("-"))
        rewritten.append(arg)
    return rewritten


def _with_our_tasks(argv: list[str]) -> list[str]:
    """Our task directory through lm-eval's own --include_path (its CLI takes one directory)."""
    given = _option(argv, "--include_path")
    if given is None:
        return [*argv, "--include_path", str(TASKS_DIR)]
    if Path(given).resolve() != TASKS_DIR.resolve():
        raise ValueError(
            f"--include_path {given}: lm-eval's CLI takes one task directory and kvcompress lm-eval passes "
            f"its own ({TASKS_DIR}); put your task files in one directory with copies of ours, or call "
            "lm_eval.simple_evaluate with kvcompress.lm_eval.task_manager(include_path=...)"
        )
    return argv


def _with_tokenizer(argv: list[str]) -> list[str]:
    """lm-eval's synthetic tasks (RULER) load a tokenizer by the name in the model args (`tokenizer`, else
    `pretrained`), and `default` is no name the hub or a directory knows: hand them the local directory load_model
    resolves it to (likewise a .gguf's converted copy is not made here: pass tokenizer= for those)."""
    if _option(argv, "--model") != "kvcompress":
        return argv
    args = _model_args(_option(argv, "--model_args") or "")
    if "tokenizer" in args or args.get("pretrained", "default") != "default":
        return argv
    return _with_model_arg(argv, f"tokenizer={default_model_dir()}")


def _with_model_arg(argv: list[str], extra: str) -> list[str]:
    """argv with `extra` (key=value) appended to --model_args (added when absent)."""
    model_args = _option(argv, "--model_args")
    if model_args is None:
        return [*argv, "--model_args", extra]
    i = next(i for i, a in enumerate(argv) if a == "--model_args" or a.startswith("--model_args="))
    if argv[i] == "--model_args":
        return [*argv[: i + 1], f"{model_args},{extra}", *argv[i + 2 :]]
    return [*argv[:i], f"--model_args={model_args},{extra}", *argv[i + 1 :]]


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _with_requests_file(argv: list[str]) -> list[str]:
    """Point the kvcompress model's per-request records next to lm-eval's output, when there is one."""
    out, model_args = _option(argv, "--output_path"), _option(argv, "--model_args")
    if _option(argv, "--model") != "kvcompress" or out is None or "requests_file=" in (model_args or ""):
        return argv
    return _with_model_arg(argv, f"requests_file={Path(out) / REQUESTS_FILE}")


def main(argv: list[str]) -> None:
    """`kvcompress lm-eval ...`: lm-eval's CLI as is, or with `--strategies a,b,c` one run per strategy (a finished
    one is not redone) and one pressure-transfer table over them; `--backend ray [--address A] [--gpus-per-worker G]
    [--cpus-per-worker C]` runs the strategies as Ray tasks, each on its own GPU (or CPUs), all at once."""
    strategies = _option(argv, "--strategies")
    if strategies is None:
        run_cli(argv)
        return
    out = Path(_option(argv, "--output_path") or "results/lm-eval")
    model_args = _option(argv, "--model_args") or "pretrained=default"
    meta = provenance(
        _model_args(model_args).get("pretrained", "default"),
        usable_device(_option(argv, "--device")),
        ["kvcompress", "lm-eval", *argv],
    )
    names = split_strategies(strategies)
    for name in names:
        parse_strategy(name)  # every strategy checked before the first run starts
    backend = Backend(
        **{
            field: kind(value)
            for flag, (field, kind) in BACKEND_FLAGS.items()
            if (value := _option(argv, flag)) is not None
        }
    )
    argv = _without(argv, "--strategies", "--model", "--output_path", "--model_args", *BACKEND_FLAGS)
    if argv and argv[0] == "run":
        argv = argv[1:]
    runs: dict[str, tuple[list[str]]] = {}
    for name in names:
        folder = out.resolve() / _slug(name)  # absolute: a Ray worker's working directory is not ours
        if _results_file(folder) is not None:
            print(f"kvcompress lm-eval: {name}: results found in {folder}, not rerun", file=sys.stderr)
            continue
        runs[name] = (
            [
                "run",
                "--model",
                "kvcompress",
                "--model_args",
                f"{model_args},strategy={name}",
                "--output_path",
                str(folder),
                *argv,
                *([] if "--log_samples" in argv else ["--log_samples"]),
            ],
        )
    device = usable_device(_option(argv, "--device"))
    args = _model_args(model_args)
    model = (args.get("pretrained", "default"), device, args.get("dtype"), args.get("kv_dtype"), args.get("weights"))
    if runs and backend.name == "ray":  # one Ray task per strategy, each on a worker's CPUs and GPU
        with RayTasks(backend, device) as tasks:
            (calibration,) = tasks.map(calibrate_model, [model])  # timed where the runs will run
            progress = _estimate(names, runs, argv, args, calibration, out, min(tasks.workers, len(runs)))
            try:
                tasks.map(run_cli, list(runs.values()), lambda i: progress.advance(list(runs)[i]))
            finally:
                progress.close()
    elif runs:
        calibration = calibrate_model(*model)
        progress = _estimate(names, runs, argv, args, calibration, out)
        try:
            for name, run in runs.items():
                run_cli(*run)
                progress.advance(name)
        finally:
            progress.close()
    if runs:  # the table's header names the timing its runs can be scaled by
        meta = {**meta, "calibration": calibration}
    print(write_table(out, names, model_args, meta, device).read_text())


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


# `kvcompress lm-eval --strategies ...` flags of its own, beside lm-eval's: where the per-strategy runs execute
BACKEND_FLAGS = {
    "--backend": ("name", str),
    "--address": ("address", str),
    "--gpus-per-worker": ("gpus_per_worker", float),
    "--cpus-per-worker": ("cpus_per_worker", float),
    "--retries": ("retries", int),
}


def _without(argv: list[str], *names: str) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not any(arg.startswith(name + "=") for name in names):
            kept.append(arg)
    return kept


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
