"""kvcompress command line: a thin shell over the Python API."""

from __future__ import annotations

import argparse
import sys

MIB = 2**20


def _strategies(args: argparse.Namespace) -> None:
    from .accounting import bytes_per_token, config_dtype, expected_kv_bytes
    from .models import load_config
    from .strategy import parse_strategy, split_strategies

    config = load_config(args.model)
    names = split_strategies(args.strategies) if args.strategies else None
    specs = [parse_strategy(n) for n in names] if names else _presets()
    full = expected_kv_bytes(config, "full", args.context)
    header = ("strategy", "retention", "codec", "tier", "bytes/token", f"KV MiB @ {args.context}", "saved vs full")
    rows = []
    for spec in specs:
        resident = expected_kv_bytes(config, spec, args.context)
        rows.append((
            str(spec), spec.retention.name, spec.codec.name, spec.tier.name,
            f"{bytes_per_token(config, spec):,.0f}", f"{resident / MIB:,.2f}", f"{1 - resident / full:.1%}",
        ))
    print(f"model {args.model}: {config.num_hidden_layers} layers, KV in {config_dtype(config)}; "
          f"one sequence of {args.context} tokens")
    _print_table(header, rows)


def _presets():
    from .strategy import list_strategies

    return list_strategies()


def _generate(args: argparse.Namespace) -> None:
    import torch

    from .accounting import expected_kv_bytes
    from .cache import make_cache
    from .models import load_model
    from .strategy import parse_strategy

    spec = parse_strategy(args.strategy)  # bad strategies fail before the model loads
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    if tokenizer is None:
        raise SystemExit(f"model {args.model!r} has no tokenizer: use a pretrained model for `generate`")
    if tokenizer.chat_template and not args.no_chat:
        messages = [{"role": "user", "content": args.prompt}]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:
        inputs = tokenizer(args.prompt, return_tensors="pt")
    inputs = inputs.to(args.device)
    cache = make_cache(model, spec)
    with torch.no_grad():
        out = model.generate(**inputs, cache=cache, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    resident = sum(cache.kv_bytes().values())
    full = expected_kv_bytes(model, "full", cache.get_seq_length())
    tiers = ", ".join(f"{t} {b / MIB:.2f} MiB" for t, b in cache.kv_bytes().items())
    print(
        f"\n[kv] {cache.spec}: {tiers} resident for {cache.stored_tokens()} of {cache.get_seq_length()} tokens; "
        f"full cache {full / MIB:.2f} MiB; saved {1 - resident / full:.1%}",
        file=sys.stderr,
    )


def _print_table(header, rows) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcompress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("strategies", help="list strategies with their KV bytes on a model (config only, no weights)")
    p.add_argument("--model", default="default", help="default, an architecture name (random:<arch>), HF id or path")
    p.add_argument("--strategies", help="comma-separated strategy strings (default: the presets)")
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence for the resident column")
    p.set_defaults(func=_strategies)

    p = sub.add_parser("generate", help="generate text under a strategy and print its KV bytes against full")
    p.add_argument("prompt")
    p.add_argument("--strategy", default="full", help="e.g. int8, sink:sinks=4,window=256+int8")
    p.add_argument("--model", default="default", help="default, HF id, local directory or .gguf path")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")
    p.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging

    logging.disable_progress_bar()
    try:
        args.func(args)
    except ValueError as err:
        raise SystemExit(f"kvcompress {args.command}: {err}") from None


if __name__ == "__main__":
    main()
