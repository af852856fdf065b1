"""The arguments of `kvcompress lm-eval`: its own flags beside lm-eval's, reading options and --model_args, and the
rewrites that hand lm-eval our tasks, the tokenizer, the request records' path and a quoted strategy."""

from __future__ import annotations

import re
from pathlib import Path

from ..models import default_model_dir
from .lm_eval_model import _STRATEGY_KEYS, REQUESTS_FILE
from .lm_eval_recall import TASKS_DIR

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
