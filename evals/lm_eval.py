"""`kvcompress lm-eval`: lm-eval's own CLI with our model and tasks, or one run per strategy and a table over them.

Importing this module imports lm_eval_model, which registers the model `kvcompress` with lm-eval; the command adds
our task directory as lm-eval's --include_path, then hands the arguments to lm-eval's own CLI.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..provenance import provenance
from ..strategy import parse_strategy, split_strategies
from .backends import Backend, RayTasks
from .cost import calibrate_model
from .lm_eval_args import (
    BACKEND_FLAGS,
    _model_args,
    _option,
    _quote_strategy,
    _with_our_tasks,
    _with_requests_file,
    _with_tokenizer,
    _without,
)
from .lm_eval_estimate import _estimate
from .lm_eval_model import usable_device
from .lm_eval_records import _results_file, _slug, write_table


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
