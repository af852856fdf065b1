"""kvcompress command line: a thin shell over the Python API."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    with make_cache(model, spec) as cache, torch.no_grad():
        out = model.generate(**inputs, cache=cache, max_new_tokens=args.max_new_tokens, do_sample=False)
        tiers, stored, seen = cache.kv_bytes(), cache.stored_tokens(), cache.get_seq_length()
    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    device = tiers.get("device", 0)
    full = expected_kv_bytes(model, "full", seen)
    where = ", ".join(f"{t} {b / MIB:.2f} MiB" for t, b in tiers.items())
    print(
        f"\n[kv] {cache.spec}: {where} resident for {stored} of {seen} tokens; "
        f"full cache {full / MIB:.2f} MiB; device KV saved {1 - device / full:.1%}",
        file=sys.stderr,
    )


def _tokens(text: str) -> int:
    """'4k' -> 4096, '512' -> 512."""
    text = text.strip().lower()
    try:
        return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)
    except ValueError:
        raise ValueError(f"token counts are integers or NNk (e.g. 512, 4k), got {text!r}") from None


def _report(args: argparse.Namespace) -> None:
    from .evals.harness import ReportConfig, Thresholds, run_report
    from .strategy import split_strategies

    command = ["kvcompress", *sys.argv[1:]]
    if args.resume:
        path = run_report(None, Path(args.resume), resume=True, command=command)
    else:
        config = ReportConfig(
            model=args.model, tasks=args.tasks.split(","), lengths=[_tokens(x) for x in args.lengths.split(",")],
            depths=args.depths, seeds=args.seeds, device=args.device, dtype=args.dtype, sessions=args.sessions,
            context=_tokens(args.context), decode_steps=args.decode_steps, fidelity_steps=args.fidelity_steps,
            fidelity_text=args.fidelity_text,
            thresholds=Thresholds(args.max_recall_loss, args.max_decode_latency, args.min_top1),
            **({"strategies": split_strategies(args.strategies)} if args.strategies else {}),
        )
        path = run_report(config, Path(args.out), command=command)
    print(path.read_text())


def _sweep(args: argparse.Namespace) -> None:
    from .evals.harness import run_report
    from .evals.sweep import load_sweep

    config, out = load_sweep(args.file)
    out = Path(args.out) if args.out else out
    resume = (out / "records.jsonl").exists() and args.resume
    path = run_report(None if resume else config, out, resume=resume, command=["kvcompress", *sys.argv[1:]])
    print(path.read_text())


def _plan(args: argparse.Namespace) -> None:
    import json

    from .accounting import config_dtype
    from .models import load_config
    from .planner import GIB, as_json, plan, resolve_gpu_memory, sizing_table
    from .strategy import split_strategies

    memory = resolve_gpu_memory(args.gpu, args.gpu_mem)
    config = load_config(args.model)
    context, strategies = _tokens(args.context), split_strategies(args.strategies)
    rows = plan(config, strategies, memory, context, args.sessions, args.weights, args.reserve)
    if args.json:
        print(json.dumps({"model": args.model, "gpu_bytes": round(memory), "context": context,
                          "sessions": args.sessions, "weights": args.weights, "rows": as_json(rows)}, indent=1))
        return
    first = rows[0]
    print(f"{args.model} on {args.gpu_mem or args.gpu} ({memory / GIB:.1f} GiB): weights {args.weights} "
          f"{first.weights_bytes / GIB:.1f} GiB, runtime reserve {first.reserve_bytes / GIB:.1f} GiB, "
          f"KV in {config_dtype(config)}; {args.sessions} sessions x {context} tokens")
    _print_table(
        ("strategy", "bytes/token", "device KV GiB", "max sessions", "max context", "verdict"),
        [(r.strategy, f"{r.bytes_per_token:,}", f"{r.kv_bytes / GIB:,.1f}",
          "unbounded" if r.max_sessions is None else f"{r.max_sessions:,}",
          "unbounded" if r.max_context is None else f"{r.max_context:,}", r.verdict) for r in rows],
    )
    print()
    _print_table(("context", "sessions", "strategy", "KV GiB", "lesson"),
                 [(f"{r['context']:,}", r["sessions"], r["strategy"], f"{r['kv_gib']:,.1f}", r["lesson"])
                  for r in sizing_table(config, memory, args.weights, args.reserve)])


def _simulate(args: argparse.Namespace) -> None:
    import json
    import statistics

    from .models import load_config
    from .planner import GIB, resolve_gpu_memory, weights_bytes
    from .provenance import provenance
    from .simulator import SimConfig, load_routes, plot_memory, simulate
    from .strategy import split_strategies

    config = load_config(args.model)
    kv_capacity = resolve_gpu_memory(args.gpu, args.gpu_mem) * (1 - args.reserve) - weights_bytes(config, args.weights)
    if kv_capacity <= 0:
        raise ValueError(f"the weights ({args.weights}) and reserve leave no memory for KV on {args.gpu_mem or args.gpu}")
    sim = SimConfig(kv_capacity, args.minutes, args.seed, args.allocator, args.block, args.admission,
                    args.idle_policy, args.ttl)
    results = simulate(config, split_strategies(args.strategies), load_routes(args.routes), sim)
    print(f"{args.model} on {args.gpu_mem or args.gpu}: {kv_capacity / GIB:.1f} GiB for KV after weights and reserve; "
          f"{args.allocator} allocator, admission {args.admission}, idle policy {args.idle_policy} "
          f"(ttl {args.ttl:g} s), {args.minutes:g} min, seed {args.seed}")
    rows = []
    for r in results:
        waits = r.queue_waits_s or [0.0]
        p95 = statistics.quantiles(waits, n=20)[-1] if len(waits) > 1 else waits[0]
        print(f"\n{r.strategy}: peak {r.peak_bytes / GIB:.1f} GiB, allocation failures {r.allocation_failures}, "
              f"evictions {r.evictions}, fragmentation {r.fragmentation_pct:.1f}%, queue wait p50 "
              f"{statistics.median(waits):.1f} s / p95 {p95:.1f} s")
        _print_table(("route", "active sessions", "avg active tokens", "KV GiB", "outcome"),
                     [(name, f"{v['active_sessions']:.2f}", f"{v['avg_active_tokens']:,}",
                       f"{v['kv_bytes'] / GIB:.2f}", v["outcome"]) for name, v in r.per_route.items()])
        rows.append({"strategy": r.strategy, "peak_bytes": r.peak_bytes, "allocation_failures": r.allocation_failures,
                     "evictions": r.evictions, "fragmentation_pct": r.fragmentation_pct,
                     "queue_wait_p50_s": statistics.median(waits), "queue_wait_p95_s": p95, "routes": r.per_route,
                     "samples": r.samples})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**provenance(args.model, "cpu", ["kvcompress", *sys.argv[1:]]), "gpu": args.gpu_mem or args.gpu,
            "kv_capacity_bytes": round(kv_capacity)}
    (out / "simulate.json").write_text(json.dumps({"meta": meta, "results": rows}) + "\n")
    png = plot_memory(results, kv_capacity, out / "kv_memory.png")
    print(f"\nwrote {out / 'simulate.json'}" + (f" and {png}" if png else ""))


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

    p = sub.add_parser("plan", help="KV memory at a target context x concurrency against a GPU (config only)")
    p.add_argument("--model", default="default", help="architecture name, HF id, local dir or config.json")
    p.add_argument("--gpu", default="H100-80GB", help="GPU preset (see the error for the list)")
    p.add_argument("--gpu-mem", help="GPU memory instead of a preset, e.g. 80GiB")
    p.add_argument("--context", default="32k")
    p.add_argument("--sessions", type=int, default=32)
    p.add_argument("--strategies", default="full,int8,fp8,sink:window=4096")
    p.add_argument("--weights", default="bf16", help="fp32, bf16, fp16, int8, nf4")
    p.add_argument("--reserve", type=float, default=0.1, help="fraction of GPU memory kept for activations/runtime")
    p.add_argument("--json", action="store_true", help="machine-readable figures (bytes as integers)")
    p.set_defaults(func=_plan)

    p = sub.add_parser("simulate", help="one GPU's KV memory under a mix of routes, per strategy (discrete events)")
    p.add_argument("--routes", required=True, help="routes YAML, e.g. experiments/routes/support_fleet.yaml")
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--gpu", default="H100-80GB")
    p.add_argument("--gpu-mem", help="GPU memory instead of a preset, e.g. 80GiB")
    p.add_argument("--weights", default="bf16")
    p.add_argument("--reserve", type=float, default=0.1)
    p.add_argument("--strategies", default="full,int8,sink:window=8192")
    p.add_argument("--minutes", type=float, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allocator", default="paged", help="paged or contiguous (max-length reservation)")
    p.add_argument("--block", type=int, default=16, help="paged block size in tokens")
    p.add_argument("--admission", default="reject", help="reject or queue")
    p.add_argument("--idle-policy", default="ttl", help="ttl (keep state until --ttl) or release")
    p.add_argument("--ttl", type=float, default=120, help="seconds an ended or disconnected session's KV is kept")
    p.add_argument("--out", default="results/simulate")
    p.set_defaults(func=_simulate)

    p = sub.add_parser("report", help="the pressure-transfer report: HBM saved vs latency vs recall vs fidelity")
    p.add_argument("--model", default="default")
    p.add_argument("--strategies", help="comma-separated strategies (default: full, int8, fp8, int4, window:window=256,"
                   " sink:sinks=4,window=252)")
    p.add_argument("--tasks", default="passkey,multikey", help="passkey, multikey, vartrack, multiturn")
    p.add_argument("--lengths", default="512,1024", help="context lengths in model tokens, e.g. 4k,16k")
    p.add_argument("--depths", type=int, default=5, help="needle depths spread over [0, 1]")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16",
                   help="model and KV dtype (default bfloat16, as KV caches are held on GPUs)")
    p.add_argument("--sessions", type=int, default=32, help="concurrent sessions for the at-scale column")
    p.add_argument("--context", default="32k", help="tokens per session for the at-scale column")
    p.add_argument("--decode-steps", type=int, default=24)
    p.add_argument("--fidelity-steps", type=int, default=100)
    p.add_argument("--fidelity-text", help="text file for teacher-forced fidelity (default: a shipped public-domain text)")
    p.add_argument("--max-recall-loss", type=float, default=2.0, help="guardrail, points")
    p.add_argument("--max-decode-latency", type=float, default=15.0, help="guardrail, percent slower than full")
    p.add_argument("--min-top1", type=float, default=0.98, help="guardrail, teacher-forced top-1 agreement")
    p.add_argument("--out", default="results/default")
    p.add_argument("--resume", metavar="DIR", help="finish an interrupted run in DIR; nothing finished is redone")
    p.set_defaults(func=_report)

    p = sub.add_parser("sweep", help="run a YAML grid of strategy parameters through the report")
    p.add_argument("file")
    p.add_argument("--out", help="output folder (default: the file's `out`)")
    p.add_argument("--resume", action="store_true", help="finish the sweep's existing records instead of refusing")
    p.set_defaults(func=_sweep)

    sub.add_parser("lm-eval", add_help=False,
                   help="lm-evaluation-harness's CLI with --model kvcompress and the kvc_* tasks registered; "
                        "--strategies a,b,c runs each and builds one pressure-transfer table")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:  # lm-eval's own arguments and --help, passed through untouched
        from .evals.lm_eval import main as lm_eval_main

        lm_eval_main(argv[1:])
        return
    args = build_parser().parse_args(argv)
    from transformers.utils import logging

    logging.disable_progress_bar()
    try:
        args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        raise SystemExit(f"kvcompress {args.command}: {err}") from None


if __name__ == "__main__":
    main()
