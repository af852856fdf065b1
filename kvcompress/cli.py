"""kvcompress command line: a thin shell over the Python API."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.table import Table
from transformers.utils import logging

from .accounting import bytes_per_token, expected_kv_bytes
from .cache import make_cache
from .dtypes import DTYPES, WEIGHTS, dtype_name, parse_dtype
from .evals.backends import BACKENDS, Backend
from .evals.config import AUTO_SESSIONS, SMOKE, ReportConfig, Thresholds
from .evals.render import terminal_rows
from .evals.replay import IDLE_POLICIES as REPLAY_IDLE_POLICIES
from .evals.replay import RECORD_FILE as REPLAY_FILE
from .evals.replay import compress_time, replay, replay_meta
from .evals.run import run_report
from .evals.sweep import load_sweep
from .geometry import config_dtype
from .models import load_config, load_model
from .planner import GIB, kv_capacity, parse_memory, plan, plan_record, resolve_gpu_memory, sizing_table
from .simulator import (
    RECORD_FILE,
    ParkCosts,
    SimConfig,
    SimResult,
    StepCosts,
    load_routes,
    simulate,
    write_simulation,
)
from .strategy import StrategySpec, list_strategies, parse_strategy, split_strategies
from .tiers import DEVICE_MEMORY
from .units import parse_tokens

MIB = 2**20
FULL = StrategySpec()  # what "saved" is measured against: every token kept, unencoded, on the device
RUNS_DIR = Path("results/runs")  # fresh run folders (git-ignored); committed reference results live beside it
LATEST = "latest"
# report flags named apart from their Thresholds field; every other flag is its ReportConfig setting's name, and
# defaults live in ReportConfig alone
THRESHOLD_FLAGS = {"max_recall_loss": "recall_loss_pts", "max_decode_latency": "decode_latency_pct", "min_top1": "top1"}


def _strategies(args: argparse.Namespace) -> None:

    config = load_config(args.model)
    dtype = parse_dtype(args.kv_dtype, "--kv-dtype") or config_dtype(config)
    names = split_strategies(args.strategies) if args.strategies else None
    specs = [parse_strategy(n) for n in names] if names else _presets()
    full = expected_kv_bytes(config, FULL, args.context, dtype=dtype)
    header = ("strategy", "retention", "codec", "tier", "bytes/token", f"KV MiB @ {args.context}", "saved vs full")
    rows = []
    for spec in specs:
        resident = expected_kv_bytes(config, spec, args.context, dtype=dtype)
        rows.append(
            (
                str(spec),
                spec.retention.name,
                spec.codec.name,
                spec.tier.name,
                f"{bytes_per_token(config, spec, dtype):,.0f}",
                f"{resident / MIB:,.2f}",
                f"{1 - resident / full:.1%}",
            )
        )
    print(
        f"model {args.model}: {config.num_hidden_layers} layers, KV stored as {dtype_name(dtype)} "
        f"({'--kv-dtype' if args.kv_dtype else 'as its config declares'}); one sequence of {args.context} tokens"
    )
    print_table(header, rows)


def _presets():

    return list_strategies()


def _generate(args: argparse.Namespace) -> None:

    spec = parse_strategy(args.strategy)  # bad strategies fail before the model loads
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, kv_dtype=args.kv_dtype)
    if tokenizer is None:
        raise SystemExit(f"model {args.model!r} has no tokenizer: use a pretrained model for `generate`")
    if tokenizer.chat_template and not args.no_chat:
        messages = [{"role": "user", "content": args.prompt}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = tokenizer(args.prompt, return_tensors="pt")
    inputs = inputs.to(args.device)
    with make_cache(model, spec) as cache, torch.no_grad():
        out = model.generate(**inputs, cache=cache, max_new_tokens=args.max_new_tokens, do_sample=False)
        tiers, stored, seen = cache.kv_bytes(), cache.stored_tokens(), cache.get_seq_length()
    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    device = tiers.get(DEVICE_MEMORY, 0)
    full = expected_kv_bytes(model, FULL, seen, dtype=model.kv_dtype)
    where = ", ".join(f"{t} {b / MIB:.2f} MiB" for t, b in tiers.items())
    print(
        f"\n[kv] {cache.spec}: {where} resident for {stored} of {seen} tokens; "
        f"full cache {full / MIB:.2f} MiB; device KV saved {1 - device / full:.1%}",
        file=sys.stderr,
    )


def _report(args: argparse.Namespace) -> None:

    backend = _backend(args)
    if args.resume:
        out = _unfinished_run(args.resume)
        path = run_report(None, out, resume=True, command=args.command_line, backend=backend)
    else:
        config = ReportConfig.from_dict({**(SMOKE if args.smoke else {}), **_given(args)})  # checked before any work
        out = Path(args.out) if args.out else _fresh_run_folder("report")
        _check_writable(out, "--out")
        path = run_report(config, out, command=args.command_line, backend=backend)
    _print_report(path)


def _print_report(path: Path) -> None:
    """The headline columns of a written report, and where it lies."""

    print_table(*terminal_rows(path.parent))
    print(f"\nwrote {path} (and records.jsonl, summary.csv, summary.json, plots) in {path.parent}")


def _given(args: argparse.Namespace) -> dict:
    """ReportConfig settings for the flags given on the command line; the rest keep the config's defaults."""

    given = {k: v for k, v in vars(args).items() if v is not None}
    settings = {name: given[name] for name in ReportConfig.fields() if name in given}
    thresholds = {field: given[flag] for flag, field in THRESHOLD_FLAGS.items() if flag in given}
    if thresholds:
        settings["thresholds"] = Thresholds(**{**vars(Thresholds()), **thresholds})
    return settings


def _fresh_run_folder(kind: str) -> Path:
    """results/runs/<kind>-<UTC time>: a new folder per run, never one that holds committed results."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    folder, n = RUNS_DIR / f"{kind}-{stamp}", 1
    while folder.exists():
        n += 1
        folder = RUNS_DIR / f"{kind}-{stamp}-{n}"
    return folder


def _unfinished_run(resume: str) -> Path:
    """The folder named, or with `--resume` alone the newest run under results/runs that has no report yet."""
    if resume != LATEST:
        return Path(resume)
    unfinished = sorted(
        (p.parent for p in RUNS_DIR.glob("*/records.jsonl") if not (p.parent / "pressure_transfer.md").exists()),
        key=lambda p: p.stat().st_mtime,
    )
    if not unfinished:
        raise ValueError(f"--resume: no unfinished run under {RUNS_DIR}/; name the folder: --resume DIR")
    print(f"resuming {unfinished[-1]}", file=sys.stderr)
    return unfinished[-1]


def _check_writable(folder: Path, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{flag} {str(folder)!r}: cannot create the folder ({err.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{flag} {str(folder)!r}: the folder is not writable")


def _backend(args: argparse.Namespace):

    return Backend(args.backend, args.address, args.workers, args.gpus_per_worker, args.cpus_per_worker, args.retries)


def _sweep(args: argparse.Namespace) -> None:

    configs, out = load_sweep(args.file)
    out = Path(args.out) if args.out else out
    resume = (out / "records.jsonl").exists() and args.resume
    if not resume:
        _check_writable(out, "--out")
    # resuming with the file's grid: records of cells still in it are kept, only the missing cells run
    path = run_report(configs, out, resume=resume, command=args.command_line, backend=_backend(args))
    _print_report(path)


def _plan(args: argparse.Namespace) -> None:

    memory = resolve_gpu_memory(args.gpu, args.gpu_mem)
    config = load_config(args.model)
    context, strategies = args.context, split_strategies(args.strategies)
    rows = plan(config, strategies, memory, context, args.sessions, args.weights, args.reserve)
    if args.json:
        print(json.dumps(plan_record(args.model, memory, context, args.sessions, args.weights, rows), indent=1))
        return
    first = rows[0]
    print(
        f"{args.model} on {args.gpu_mem or args.gpu} ({memory / GIB:.1f} GiB): weights {args.weights} "
        f"{first.weights_bytes / GIB:.1f} GiB, runtime reserve {first.reserve_bytes / GIB:.1f} GiB, "
        f"KV in {config_dtype(config)}; {args.sessions} sessions x {context} tokens"
    )
    print_table(
        ("strategy", "bytes/token", "device KV GiB", "max sessions", "max context", "verdict"),
        [
            (
                r.strategy,
                f"{r.bytes_per_token:,}",
                f"{r.kv_bytes / GIB:,.1f}",
                "unbounded" if r.max_sessions is None else f"{r.max_sessions:,}",
                "unbounded" if r.max_context is None else f"{r.max_context:,}",
                r.verdict,
            )
            for r in rows
        ],
    )
    print()
    print_table(
        ("context", "sessions", "strategy", "KV GiB", "lesson"),
        [
            (f"{r['context']:,}", r["sessions"], r["strategy"], f"{r['kv_gib']:,.1f}", r["lesson"])
            for r in sizing_table(config, memory, args.weights, args.reserve)
        ],
    )


def _simulate(args: argparse.Namespace) -> None:

    out = Path(args.out) if args.out else _fresh_run_folder("simulate")
    if (out / RECORD_FILE).exists():
        raise ValueError(f"--out {str(out)!r} already holds {RECORD_FILE}: choose another folder or remove it first")
    _check_writable(out, "--out")
    parks = args.idle_policy == "park"
    steps = StepCosts.read(args.step_costs) if args.step_costs else None
    if steps and args.prefill_tps is not None:
        raise ValueError(f"--prefill-tps is not read with --step-costs: {args.step_costs} prices every prefill")
    for flag, value in (("--park-costs", args.park_costs), ("--prefill-tps", args.prefill_tps)):
        if parks and value is None and not (steps and flag == "--prefill-tps"):
            also = " (or --step-costs)" if flag == "--prefill-tps" else ""
            raise ValueError(f"--idle-policy park needs {flag}{also} (see kvcompress simulate --help)")
        if not parks and value is not None:
            raise ValueError(f"{flag} is read only with --idle-policy park, not {args.idle_policy}")
    if parks and not steps and not args.prefill_tps > 0:
        raise ValueError(f"--prefill-tps must be a positive number of tokens/s, got {args.prefill_tps:g}")
    config, gpu = load_config(args.model), args.gpu_mem or args.gpu
    sim = SimConfig(
        kv_capacity(config, args.gpu, args.gpu_mem, args.weights, args.reserve),
        args.minutes,
        args.seed,
        args.allocator,
        args.block,
        args.admission,
        args.idle_policy,
        args.ttl,
        host_bytes=parse_memory(args.host_mem, "--host-mem"),
        pcie_bytes_per_s=args.pcie_gbps * 1e9,
        disk_bytes=parse_memory(args.disk_mem, "--disk-mem"),
        disk_bytes_per_s=args.disk_gbps * 1e9,
        park_costs=ParkCosts.read(args.park_costs) if parks else None,
        prefill_tps=args.prefill_tps,
        step_costs=steps,
    )
    results = simulate(config, split_strategies(args.strategies), load_routes(args.routes), sim)
    print(
        f"{args.model} on {gpu}: {sim.gpu_bytes / GIB:.1f} GiB for KV after weights and reserve; "
        f"{args.allocator} allocator, admission {args.admission}, idle policy {args.idle_policy} "
        f"(ttl {args.ttl:g} s), {args.minutes:g} min, seed {args.seed}"
    )
    if steps:
        calibration = steps.calibration_prefill_1k_s
        print(
            f"step costs from {steps.source}: measured with {steps.model or 'an unnamed model'} on "
            f"{steps.device or 'an unnamed machine'}"
            + (f" (1k-token prefill {calibration:.2f} s there)" if calibration else "")
            + ("" if steps.model == args.model else f", not --model {args.model}: the times are that model's there")
        )
    if parks:
        costs = sim.park_costs
        reprefill = f"{args.prefill_tps:,.0f} tokens/s" if args.prefill_tps else "the step costs' prefill"
        print(
            f"park costs from {costs.source} ({costs.length} tokens): save {costs.save_bytes_per_s / 1e6:,.0f} MB/s, "
            f"load {costs.load_bytes_per_s / 1e6:,.0f} MB/s, restore overhead {costs.restore_overhead_s:.3f} s; "
            f"re-prefill at {reprefill}"
        )
    for result in results:
        _print_simulation(result)
    path, png = write_simulation(out, results, sim, args.model, gpu, args.command_line)
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))


def _replay(args: argparse.Namespace) -> None:
    routes = compress_time(load_routes(args.routes), args.speedup)
    budget = parse_memory(args.kv_budget, "--kv-budget")
    if not budget > 0:
        raise ValueError(f"--kv-budget must be a positive size such as 100MiB, got {args.kv_budget!r}")
    strategies = split_strategies(args.strategies)
    for strategy in strategies:
        parse_strategy(strategy)
    if args.idle_policy not in REPLAY_IDLE_POLICIES:
        raise ValueError(f"--idle-policy must be one of {', '.join(REPLAY_IDLE_POLICIES)}, got {args.idle_policy!r}")
    steps = StepCosts.read(args.step_costs) if args.step_costs else None
    sim = SimConfig(
        budget,
        args.minutes / args.speedup,
        args.seed,
        args.allocator,
        args.block,
        args.admission,
        args.idle_policy,
        args.ttl / args.speedup,
        step_costs=steps,
    )
    out = Path(args.out) if args.out else _fresh_run_folder("replay")
    _check_writable(out, "--out")
    model, tokenizer = load_model(args.model, args.dtype)
    meta = replay_meta(args.model, model, sim, args.routes, args.speedup, args.command_line)
    record = replay(model, tokenizer, strategies, routes, sim, out, meta)
    print(
        f"{args.model}: KV budget {budget / MIB:,.0f} MiB, {args.minutes:g} min of trace at speedup {args.speedup:g}; "
        f"calibration: 1k-token prefill {meta['calibration']['prefill_1k_s']:.2f} s on {meta['device']}"
    )
    for r in record["results"]:
        p, e = r["predicted"], r["relative_error"]
        print(
            f"{r['strategy']}: peak {r['peak_kv_bytes'] / MIB:.1f} MiB (simulator {p['peak_kv_bytes'] / MIB:.1f}), "
            f"allocation failures {r['allocation_failures']} ({p['allocation_failures']}), TTFT p95 "
            f"{r['ttft_p95_s']:.2f} s ({p['ttft_p95_s']:.2f}), decode {r['decode_tps']:.1f} tokens/s per session "
            f"({p['decode_tps']:.1f}); relative errors "
            + ", ".join(f"{k} {v:+.0%}" if v is not None else f"{k} n/a" for k, v in e.items())
        )
    print(f"\nwrote {out / REPLAY_FILE}")


def _print_simulation(r: SimResult) -> None:
    """One strategy's run: its headline figures, then a table of its routes."""

    p50, p95 = r.queue_wait_s()
    peaks = ", ".join(f"{memory} {n / GIB:.1f} GiB" for memory, n in r.peak_off_device_bytes.items())
    offload = (
        f"; off the GPU: peak {peaks}, link demand {r.link_utilisation['mean']:.0%} mean / "
        f"{r.link_utilisation['peak']:.0%} peak of what it carries, decode speed {r.decode_speed['mean']:.2f}x"
        if any(r.peak_off_device_bytes.values())
        else ""
    )
    failures = ", ".join(f"{n} short of {memory}" for memory, n in r.failures_by_memory.items() if n)
    print(
        f"\n{r.strategy}: peak {r.peak_bytes / GIB:.1f} GiB on the GPU, allocation failures "
        f"{r.allocation_failures}{f' ({failures})' if failures else ''}, evictions {r.evictions}, fragmentation "
        f"{r.fragmentation_pct:.1f}%, queue wait p50 {p50:.1f} s / p95 {p95:.1f} s{offload}"
    )
    if r.step_costs:  # measured step costs' figures, only for runs given them
        k, grid = r.step_costs, r.step_costs["grid"]
        print(
            f"decode {k['decode_tps']:.1f} tokens/s per session (batch {k['batch_mean']:.1f} mean, {k['batch_max']} "
            f"max), first token {k['ttft_mean_s']:.2f} s mean / {k['ttft_p95_s']:.2f} s p95; outside the measured "
            f"grid (batch <= {grid['batches'][-1]}, context <= {grid['contexts'][-1]:,}, prompt <= "
            f"{grid['prompts'][-1]:,}): {k['extrapolated']['decode']} of {k['lookups']['decode']} decode steps, "
            f"{k['extrapolated']['prefill']} of {k['lookups']['prefill']} prefills (largest: batch "
            f"{k['largest']['batch']}, context {k['largest']['context']:,}, prompt {k['largest']['prompt']:,})"
        )
    if r.park:  # the park policy's columns, only for its runs, so the other policies print what they always did
        k = r.park
        print(
            f"parked on the host: mean {k['mean_parked_bytes'] / GIB:.1f} GiB, peak {k['peak_parked_bytes'] / GIB:.1f}"
            f" GiB; {k['restores']} restores add {k['restore_ttft_mean_s']:.2f} s mean / {k['restore_ttft_p95_s']:.2f}"
            f" s p95 to the first token, where a re-prefill would add {k['reprefill_ttft_mean_s']:.2f} s / "
            f"{k['reprefill_ttft_p95_s']:.2f} s; {k['restore_failures']} restores found no device room, "
            f"{k['park_refusals']} parks no host room"
        )
    park_header = ("host GiB", "restores", "restore s mean/p95", "re-prefill s mean/p95")
    steps_header = ("tokens/s per session", "batch", "first token s mean/p95")
    print_table(
        (
            "route",
            "active sessions",
            "avg active tokens",
            "KV GiB",
            *(steps_header if r.step_costs else ()),
            *(park_header if r.park else ()),
            "outcome",
        ),
        [
            (
                name,
                f"{v['active_sessions']:.2f}",
                f"{v['avg_active_tokens']:,}",
                f"{v['kv_bytes'] / GIB:.2f}",
                *(
                    (
                        f"{v['decode_tps']:.1f}",
                        f"{v['batch_mean']:.1f}",
                        f"{v['ttft_mean_s']:.2f} / {v['ttft_p95_s']:.2f}",
                    )
                    if r.step_costs
                    else ()
                ),
                *(
                    (
                        f"{v['parked_bytes'] / GIB:.2f}",
                        v["restores"],
                        f"{v['restore_ttft_mean_s']:.2f} / {v['restore_ttft_p95_s']:.2f}",
                        f"{v['reprefill_ttft_mean_s']:.2f} / {v['reprefill_ttft_p95_s']:.2f}",
                    )
                    if r.park
                    else ()
                ),
                v["outcome"],
            )
            for name, v in r.per_route.items()
        ],
    )


def print_table(header, rows) -> None:
    """A table as wide as the terminal (120 columns when there is none), long cells wrapped within their column."""

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name in header:
        table.add_column(str(name), overflow="fold")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    Console(width=shutil.get_terminal_size((120, 24)).columns, soft_wrap=False).print(table)


def _token_count(text: str) -> int:
    try:
        return parse_tokens(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(prog="kvcompress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    dtypes = list(DTYPES)

    p = sub.add_parser("strategies", help="list strategies with their KV bytes on a model (config only, no weights)")
    p.add_argument("--model", default="default", help="default, an architecture name (random:<arch>), HF id or path")
    p.add_argument("--strategies", help="comma-separated strategy strings (default: the presets)")
    p.add_argument(
        "--context", type=_token_count, default=4096, help="tokens per sequence for the resident column, e.g. 32k"
    )
    p.add_argument("--kv-dtype", choices=dtypes, help="dtype of full-precision KV (default: what the config declares)")
    p.set_defaults(func=_strategies)

    p = sub.add_parser("generate", help="generate text under a strategy and print its KV bytes against full")
    p.add_argument("prompt")
    p.add_argument("--strategy", default="full", help="e.g. int8, sink:sinks=4,window=256+int8")
    p.add_argument("--model", default="default", help="default, HF id, local directory or .gguf path")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--dtype",
        choices=dtypes,
        help="compute dtype (default: the KV dtype where this device computes it natively, else float32)",
    )
    p.add_argument(
        "--kv-dtype", choices=dtypes, help="dtype full-precision KV is stored in (default: the checkpoint's)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")
    p.set_defaults(func=_generate)

    p = sub.add_parser("plan", help="KV memory at a target context x concurrency against a GPU (config only)")
    p.add_argument("--model", default="default", help="architecture name, HF id, local dir or config.json")
    p.add_argument("--gpu", default="H100-80GB", help="GPU preset (see the error for the list)")
    p.add_argument("--gpu-mem", help="GPU memory instead of a preset, e.g. 80GiB")
    p.add_argument("--context", type=_token_count, default=32768, help="tokens per session, e.g. 32k")
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
    p.add_argument(
        "--idle-policy",
        default="ttl",
        help="ttl (keep state until --ttl), release, or park (to host memory whenever not decoding, restored on the "
        "next turn; needs --park-costs and --prefill-tps)",
    )
    p.add_argument("--ttl", type=float, default=120, help="seconds an ended or disconnected session's KV is kept")
    p.add_argument("--host-mem", default="256GiB", help="host RAM for offloaded KV (host tier), e.g. 256GiB")
    p.add_argument("--pcie-gbps", type=float, default=55.0, help="host->GPU GB/s (55: pinned H2D measured on an H200)")
    p.add_argument("--disk-mem", default="2TiB", help="disk space for offloaded KV (disk tier)")
    p.add_argument("--disk-gbps", type=float, default=3.0, help="disk read GB/s (an NVMe through a file system)")
    p.add_argument(
        "--park-costs",
        metavar="FILE",
        help="reuse.json from python experiments/bench_reuse.py: park and restore throughput (--idle-policy park)",
    )
    p.add_argument(
        "--prefill-tps",
        type=float,
        help="prefill tokens/s of --model on --gpu, pricing the re-prefill that park avoids (--idle-policy park; "
        "not read with --step-costs)",
    )
    p.add_argument(
        "--step-costs",
        metavar="FILE",
        help="steps.json from python experiments/bench_steps.py: decode step seconds by batch and context and prefill "
        "seconds by prompt length, per strategy, instead of one constant decode rate and free prompts",
    )
    p.add_argument(
        "--out", help=f"output folder, refused if it holds results (default: a new {RUNS_DIR}/simulate-<time>)"
    )
    p.set_defaults(func=_simulate)

    p = sub.add_parser(
        "replay", help="the simulator's trace played through the real model with real caches, beside its prediction"
    )
    p.add_argument("--routes", required=True, help="routes YAML, e.g. experiments/routes/support_fleet_cpu.yaml")
    p.add_argument("--kv-budget", required=True, help="memory the sessions' KV may use, e.g. 100MiB")
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", help="compute dtype (default: the model's on its device)")
    p.add_argument("--strategies", default="full,int8")
    p.add_argument("--minutes", type=float, default=10, help="minutes of trace (before --speedup)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speedup", type=float, default=1.0, help="compress the trace's time: arrivals and think times")
    p.add_argument("--allocator", default="paged", help="paged or contiguous (max-length reservation)")
    p.add_argument("--block", type=int, default=16, help="paged block size in tokens")
    p.add_argument("--admission", default="reject", help="reject or queue")
    p.add_argument("--idle-policy", default="ttl", help="ttl (keep state until --ttl) or release")
    p.add_argument("--ttl", type=float, default=120, help="seconds of trace an ended session's KV is kept")
    p.add_argument(
        "--step-costs",
        metavar="FILE",
        help="steps.json from python experiments/bench_steps.py on this machine: prices the simulator's prediction "
        "(without it the simulator decodes at one constant rate and prompts cost nothing)",
    )
    p.add_argument(
        "--out",
        help=f"output folder; rerun with the same settings to finish an interrupted replay "
        f"(default: a new {RUNS_DIR}/replay-<time>)",
    )
    p.set_defaults(func=_replay)

    d = ReportConfig.default
    p = sub.add_parser("report", help="the pressure-transfer report: HBM saved vs latency vs recall vs fidelity")
    p.add_argument("--model", help=f"default, HF id, local directory, .gguf path (default: {d('model')})")
    p.add_argument(
        "--strategies",
        type=_strategy_list,
        help=f"comma-separated strategies, or a set: quick (the default: {','.join(d('strategies'))}) or wide "
        "(quick and the members it leaves out for time: int4, fp8, window, kvzip, full+disk)",
    )
    p.add_argument(
        "--tasks",
        type=lambda text: text.split(","),
        help=f"passkey, multikey, vartrack, multiturn, or RULER's ruler_niah_single_1..3, "
        f"ruler_niah_multikey_1..3, ruler_niah_multivalue, ruler_niah_multiquery, ruler_vt, ruler_cwe, "
        f"ruler_fwe (default: {','.join(d('tasks'))})",
    )
    p.add_argument(
        "--lengths",
        type=_token_counts,
        help=f"context lengths in model tokens, e.g. 512,4k (default: {','.join(map(str, d('lengths')))})",
    )
    p.add_argument("--depths", type=int, help=f"needle depths spread over [0, 1] (default: {d('depths')})")
    p.add_argument("--seeds", type=int, help=f"(default: {d('seeds')})")
    p.add_argument("--device", help=f"cpu, cuda, cuda:N (default: {d('device')})")
    p.add_argument(
        "--kv-dtype",
        choices=dtypes,
        help=f"dtype full-precision KV is stored in, as the deployment holds it (default: {d('kv_dtype')})",
    )
    p.add_argument(
        "--compute-dtype",
        choices=dtypes,
        help="dtype the model computes in (default: the KV dtype where "
        "the device computes it natively, else float32; the records say which and why)",
    )
    p.add_argument(
        "--weights",
        choices=WEIGHTS,
        help="load the weights quantised by bitsandbytes, for a model whose "
        "16-bit weights do not fit (default: the checkpoint's, in the compute dtype); recorded in every record",
    )
    p.add_argument(
        "--questions",
        type=lambda text: text.split(","),
        help=f"question placements: after (compressed before the question, as in a chat), inside (the "
        f"question is part of the prompt) (default: {','.join(d('questions'))})",
    )
    p.add_argument(
        "--followups",
        type=int,
        help="questions per case, each about another needle (multikey, vartrack, RULER's multi-key, multi-value, "
        "multi-query and vt tasks): the context is compressed once and every question is recorded with its index "
        f"(default: {d('followups')}, one question)",
    )
    p.add_argument(
        "--modes",
        type=lambda text: text.split(","),
        help="how follow-ups meet the compressed context: reuse (every question from the context as stored, the "
        "previous answer dropped), chat (one conversation, eviction going on) "
        f"(default: {','.join(d('modes'))})",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="latency cells of strategies with a static "
        "decode step (retention full on the device tier, codec without residual) run it compiled whole: "
        "torch.compile, plus CUDA graphs on a GPU; the others run eager; records say which",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        help="score-based retentions prefill this many tokens at a time, "
        "evicting between chunks (default: the whole prompt at once)",
    )
    p.add_argument(
        "--sessions", type=int, help=f"concurrent sessions for the at-scale column (default: {d('sessions')})"
    )
    p.add_argument(
        "--context", type=_token_count, help=f"tokens per session for the at-scale column (default: {d('context')})"
    )
    p.add_argument(
        "--kv-budget",
        help="capacity cells: KV memory sessions share, e.g. 96MiB; at each latency length the most sessions whose "
        "measured peak KV fits it decode as one batch, for sessions and tokens/s at the budget against full's; "
        f"none: no capacity cells (default: {d('kv_budget')}, {AUTO_SESSIONS} sessions of full at each latency "
        "length by their analytic KV)",
    )
    p.add_argument(
        "--capacity-rounds",
        type=int,
        help=f"times every capacity cell runs, interleaved (default: {d('capacity_rounds')})",
    )
    p.add_argument(
        "--outputs",
        type=int,
        help="output-length cells: this many passages, each with a request for a long answer, generated to EOS or "
        f"--output-cap tokens; answer length against full's on the same prompts (default: {d('outputs')}, none)",
    )
    p.add_argument("--output-cap", type=int, help=f"most tokens of a free answer (default: {d('output_cap')})")
    p.add_argument(
        "--max-new-tokens", type=int, help=f"answer budget of a recall case (default: {d('max_new_tokens')})"
    )
    p.add_argument(
        "--recall-batch",
        type=int,
        help=f"recall cases of one task and length run as one left-padded "
        f"batch of up to this many rows; 1: one at a time (default: {d('recall_batch')})",
    )
    p.add_argument("--decode-steps", type=int, help=f"(default: {d('decode_steps')})")
    p.add_argument(
        "--latency-lengths",
        type=_token_counts,
        help="context lengths of the latency cells, e.g. 512,1k (default: the longest of --lengths)",
    )
    p.add_argument(
        "--latency-rounds",
        type=int,
        help=f"times every latency cell runs, interleaved; the decode interval "
        f"resamples whole rounds (default: {d('latency_rounds')})",
    )
    p.add_argument("--fidelity-steps", type=int, help=f"(default: {d('fidelity_steps')})")
    p.add_argument(
        "--fidelity-text", help="text file for teacher-forced fidelity (default: a shipped public-domain text)"
    )
    t = Thresholds()
    p.add_argument("--max-recall-loss", type=float, help=f"guardrail, points (default: {t.recall_loss_pts:g})")
    p.add_argument(
        "--max-decode-latency",
        type=float,
        help=f"guardrail, percent slower than full (default: {t.decode_latency_pct:g})",
    )
    p.add_argument("--min-top1", type=float, help=f"guardrail, teacher-forced top-1 agreement (default: {t.top1:g})")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a one-minute grid (3 strategies, one short task) that checks "
        "the pipeline end to end; its numbers mean nothing. Flags given beside it still apply",
    )
    p.add_argument(
        "--out", help=f"output folder, refused if it holds finished records (default: a new {RUNS_DIR}/report-<time>)"
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=LATEST,
        metavar="DIR",
        help=f"finish an interrupted run in DIR (alone: the newest unfinished run under {RUNS_DIR}/); "
        "nothing finished is redone",
    )
    _backend_flags(p)
    p.set_defaults(func=_report)

    p = sub.add_parser("sweep", help="run a YAML grid of models and strategy parameters through the report")
    p.add_argument("file")
    p.add_argument("--out", help="output folder (default: the file's `out`)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="run only the cells the output folder lacks (an interrupted "
        "sweep, or the file's grid widened) instead of refusing",
    )
    _backend_flags(p)
    p.set_defaults(func=_sweep)

    sub.add_parser(
        "lm-eval",
        add_help=False,
        help="lm-evaluation-harness's CLI with --model kvcompress and the kvc_* tasks registered; "
        "--strategies a,b,c runs each and builds one pressure-transfer table",
    )
    return parser


def _backend_flags(p: argparse.ArgumentParser) -> None:

    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="local",
        help="where cells run: local (this process) or ray "
        "(workers on the GPUs of a node or a Ray cluster; the driver alone writes the records)",
    )
    p.add_argument("--address", help="ray: a running cluster (auto, or HOST:PORT); default: start Ray on this machine")
    p.add_argument(
        "--workers",
        type=int,
        help="ray: workers to start, each loading the model once "
        "(default: as many as the cluster's CPUs and GPUs hold)",
    )
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        help="ray: GPUs each worker holds (default: 1 when the run's device is cuda, else 0)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        default=Backend.cpus_per_worker,
        help="ray: CPUs each worker holds (and the threads it computes with) (default: %(default)s)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=Backend.retries,
        help="ray: times a cell whose worker died is rerun before it is recorded as error (default: %(default)s)",
    )


def _token_counts(text: str) -> list[int]:
    return [_token_count(item) for item in text.split(",") if item.strip()]


def _strategy_list(text: str) -> list[str]:

    return split_strategies(text)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # lm-eval's own arguments and --help, passed through untouched
        # lazy: the lm-eval integration imports lm-eval, an optional dependency (the eval extra)
        from .evals.lm_eval import main as lm_eval_main

        lm_eval_main(argv[1:])
        return
    args = build_parser().parse_args(argv)
    args.command_line = ["kvcompress", *argv]  # what the results record: these arguments, not the process's

    logging.disable_progress_bar()
    try:
        args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        raise SystemExit(f"kvcompress {args.command}: {err}") from None


if __name__ == "__main__":
    main()
