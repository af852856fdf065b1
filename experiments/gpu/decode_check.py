"""GPU check of fused decode over encoded KV (issue 12), in one process:

1. correctness on CUDA: each quantizing strategy generates the same tokens fused (the Triton kernel) as decoded, on a
   tiny random Llama in bf16 with a left-padded batch of 2;
2. HBM bandwidth, measured (device-to-device copies of 2 GiB);
3. decode ms/token and peak memory on a random-weight Llama-3.1-8B-shaped model in bf16 at contexts 8k and 32k,
   batch 1 and 8, for transformers' DynamicCache, our full (exact and preallocated storage), int8/fp8/int4 fused
   and decoded, sink and full+host, and at 8k the static decode step compiled whole (full and int8: torch.compile
   with CUDA graphs, make_cache(compile=True); its warm-up steps compile and capture it),
   beside the read lower bound: (KV bytes the step reads + weight bytes) / measured HBM bandwidth. One prefill of the
   longest context (batch 1) serves every cell: a causal prefill's first n tokens are an n-token prefill, and rows of
   a batch may repeat (weights are random; memory and latency do not depend on values).

Targets at the longest context and largest batch run (32k, batch 8 by default): int8 and fp8 fused <= 0.75x full
(the limit of reading half the bytes is 0.5x), int4 <= int8; at the shortest context (8k), batch 1: compiled `full`
within 1.3x of its read bound.

    bash experiments/gpu/decode_check.sh [OUT_DIR]

Without a GPU, try the script itself (tests/test_experiment_scripts.py does, in CI):

    python experiments/gpu/decode_check.py --device cpu --model random:tiny --contexts 32,48 --batches 1,2 --steps 3
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from transformers import DynamicCache

import kvcompress
from kvcompress.provenance import provenance, provenance_lines
from kvcompress.strategy import split_strategies

GB = 1e9
HF = "HF DynamicCache"
STRATEGIES = [
    HF,
    "full",
    "full grow",
    "int8",
    "int8 decoded",
    "fp8",
    "fp8 decoded",
    "int4",
    "int4 decoded",
    "sink:sinks=4,window=2044",
    "full+host",
    "full compiled",
    "int8 compiled",
]
TARGETS = [("int8", "full", 0.75), ("fp8", "full", 0.75), ("int4", "int8", 1.0)]


def make(model, name: str, max_tokens: int, batch: int):
    if name == HF:
        return DynamicCache(config=model.config)
    strategy, _, how = name.partition(" ")
    options = {"": {}, "decoded": {"fused": False}, "grow": {"grow": 256}, "compiled": {"compile": True}}[how]
    return kvcompress.make_cache(model, strategy, max_tokens=max_tokens, batch_size=batch, **options)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def correctness(device: str) -> list[dict]:
    model, _ = kvcompress.load_model("random:tiny", dtype=torch.bfloat16, device=device)
    ids = torch.randint(3, 500, (2, 300), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[0, :37] = 0
    rows = []
    for strategy in (
        "int8",
        "fp8",
        "fp8:format=e5m2,group=32",
        "int4",
        "int4:group=16,residual=32",
        "sink:sinks=4,window=128+int8",
    ):
        try:
            runs = {}
            for fused in (False, True):
                cache = kvcompress.make_cache(model, strategy, fused=fused)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    cache=cache,
                    max_new_tokens=24,
                    min_new_tokens=24,
                    do_sample=False,
                    pad_token_id=0,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
                runs[fused] = (out.sequences, torch.stack(out.logits).float(), cache.fused)
            rows.append(
                {
                    "strategy": strategy,
                    "fused_ran": runs[True][2],
                    "same_tokens": bool(torch.equal(runs[True][0], runs[False][0])),
                    "max_abs_logit_diff": (runs[True][1] - runs[False][1]).abs().max().item(),
                }
            )
        except Exception as error:  # one broken case must not hide the others
            rows.append({"strategy": strategy, "error": repr(error), "trace": traceback.format_exc()[-1500:]})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def hbm_bandwidth(device: str, size: int = 2 * 2**30) -> float:
    """Bytes per second a device-to-device copy moves (read + write), best of 10."""
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    del src, dst
    return 2 * size / best


@torch.no_grad()
def prefill(model, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in cache.layers]


@torch.no_grad()
def cell(
    model, kv, name: str, context: int, batch: int, steps: int, warmup: int, weight_bytes: int, bandwidth: float
) -> dict:
    cache = make(model, name, context + steps + 8, batch)
    for index, (keys, values) in enumerate(kv):
        keys = keys[:, :, :context].expand(batch, -1, -1, -1).contiguous()
        values = values[:, :, :context].expand(batch, -1, -1, -1).contiguous()
        cache.update(keys, values, index) if name == HF else cache.layers[index].update(keys, values)
    del keys, values
    gc.collect()
    device = str(model.device)
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    token = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
    step = kvcompress.compiled_step(model) if getattr(cache, "static", False) else model
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step(input_ids=token, cache=cache, use_cache=True)
        sync(device)
        times.append(time.perf_counter() - start)
    decode_ms = statistics.median(times[warmup:]) * 1e3
    if name == HF:
        kv_device = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        fused = None
    else:
        kv_device = cache.kv_bytes().get("device", 0)
        fused = cache.fused
    moved = cache.transfer_stats() if hasattr(cache, "transfer_stats") else {}
    read_bound_ms = (kv_device + weight_bytes) / bandwidth * 1e3
    row = {
        "strategy": name,
        "context": context,
        "batch": batch,
        "fused": fused,
        "decode_ms_p50": round(decode_ms, 3),
        "decode_ms_min": round(min(times[warmup:]) * 1e3, 3),
        "peak_device_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
        "kv_device_bytes": kv_device,
        "read_bound_ms": round(read_bound_ms, 3),
        "kv_read_bound_ms": round(kv_device / bandwidth * 1e3, 3),
        "vs_read_bound": round(decode_ms / read_bound_ms, 3),
        "moved_bytes": {k: v for k, v in moved.items() if k.endswith("_bytes")},
    }
    if hasattr(cache, "close"):
        cache.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:llama-3.1-8b")
    parser.add_argument("--contexts", default="8192,32768")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--budget-s", type=float, default=210, help="stop starting cells after this many seconds")
    parser.add_argument(
        "--device", default="cuda", help="cuda; cpu only to try the script itself (--model random:tiny)"
    )
    parser.add_argument("--out", default="results/gpu")
    args = parser.parse_args()
    started = time.perf_counter()
    meta = provenance(args.model, args.device, ["bash", "experiments/gpu/decode_check.sh", *sys.argv[1:]])
    meta.update(steps=args.steps, warmup=args.warmup, dtype="bfloat16")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "correctness": correctness(args.device), "rows": []}
    bandwidth = hbm_bandwidth(args.device, 2 * 2**30 if args.device.startswith("cuda") else 2**28)
    result["hbm_bytes_per_s"] = bandwidth
    print(f"HBM copy bandwidth: {bandwidth / GB:.0f} GB/s", file=sys.stderr)

    model, _ = kvcompress.load_model(args.model, dtype=torch.bfloat16, device=args.device)
    weight_bytes = sum(p.nbytes for p in model.parameters())
    contexts = [int(c) for c in args.contexts.split(",")]
    kv = prefill(model, max(contexts))
    # What lives from here on (modules, model, prefill) is never garbage: keep the per-cell collections from scanning
    # it (0.25 s each on a CPU process with transformers imported, twice per cell)
    gc.freeze()
    names = split_strategies(args.strategies)
    batches = sorted((int(b) for b in args.batches.split(",")), reverse=True)
    # the targets' cells first (32k batch 8, then compiled full at 8k batch 1), should time run out
    grid = [
        (context, batch, name)
        for context in sorted(contexts, reverse=True)
        for batch in batches
        for name in names
        if not name.endswith(" compiled") or context == min(contexts)
    ]  # a compilation of the 8B step: a minute
    grid.sort(key=lambda c: 0 if c[:2] == (max(contexts), max(batches)) else 1 if c[2] == "full compiled" else 2)
    for context, batch, name in grid:
        if time.perf_counter() - started > args.budget_s:
            row = {"strategy": name, "context": context, "batch": batch, "skipped": "time budget"}
        else:
            try:
                row = cell(model, kv, name, context, batch, args.steps, args.warmup, weight_bytes, bandwidth)
            except torch.OutOfMemoryError as error:
                row = {"strategy": name, "context": context, "batch": batch, "error": f"out of memory: {error}"[:300]}
            except Exception as error:  # keep every finished cell
                row = {
                    "strategy": name,
                    "context": context,
                    "batch": batch,
                    "error": repr(error)[:300],
                    "trace": traceback.format_exc()[-1500:],
                }
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        result["rows"].append(row)
        print(json.dumps(row), file=sys.stderr)
        (out / "decode.json").write_text(json.dumps(result, indent=1) + "\n")
    result["targets"] = targets(result["rows"])
    result["wall_s"] = round(time.perf_counter() - started, 1)
    (out / "decode.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "decode.md").write_text(markdown(result))
    print(markdown(result))


def targets(rows: list[dict]) -> list[dict]:
    """The targets at the run's longest context and largest batch (32k, batch 8 by default), and the compiled step's
    at its shortest context, batch 1 (8k)."""
    if not rows:
        return []
    ms = {(r["strategy"], r["context"], r["batch"]): r["decode_ms_p50"] for r in rows if "decode_ms_p50" in r}
    context, batch = max(r["context"] for r in rows), max(r["batch"] for r in rows)
    verdicts = []
    for strategy, reference, limit in TARGETS:
        key, ref = (strategy, context, batch), (reference, context, batch)
        verdict = {"strategy": strategy, "over": reference, "context": context, "batch": batch, "limit": limit}
        if key in ms and ref in ms:
            ratio = ms[key] / ms[ref]
            verdict.update(ratio=round(ratio, 3), met=ratio <= limit)
        else:
            verdict.update(met=None, why="a cell did not run (see rows)")
        verdicts.append(verdict)
    compiled = [r for r in rows if r["strategy"] == "full compiled" and r.get("batch") == 1 and "vs_read_bound" in r]
    verdict = {"strategy": "full compiled", "over": "KV + weights read bound", "limit": 1.3}
    if compiled:
        r = compiled[0]
        verdict.update(context=r["context"], batch=1, ratio=r["vs_read_bound"], met=r["vs_read_bound"] <= 1.3)
    else:
        verdict.update(met=None, why="the cell did not run (see rows)")
    return verdicts + [verdict]


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        "# GPU decode: fused attention over encoded KV",
        "",
        *provenance_lines(meta),
        f"- bf16, random weights; decode ms/token: median of {meta['steps'] - meta['warmup']} steps after "
        f"{meta['warmup']} warm-up; HBM copy bandwidth {result['hbm_bytes_per_s'] / GB:.0f} GB/s; read bound = "
        "(device KV bytes + weight bytes) / that bandwidth",
        "",
        "## Correctness (fused vs decoded, tiny random Llama, bf16, left-padded batch 2, 24 tokens)",
        "",
        "| strategy | fused ran | same tokens | max logit diff |",
        "|---|---|---|---|",
    ]
    for r in result["correctness"]:
        if "error" in r:
            lines.append(f"| {r['strategy']} | error: {r['error'][:80]} | | |")
        else:
            lines.append(f"| {r['strategy']} | {r['fused_ran']} | {r['same_tokens']} | {r['max_abs_logit_diff']:.3g} |")
    lines += [
        "",
        "## Decode",
        "",
        "| context | batch | strategy | ms/token p50 | read bound ms | vs bound | device KV GiB | peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "decode_ms_p50" not in r:
            lines.append(
                f"| {r['context']} | {r['batch']} | {r['strategy']} | {r.get('skipped') or r.get('error', '')[:80]} "
                "| | | | |"
            )
            continue
        lines.append(
            f"| {r['context']} | {r['batch']} | {r['strategy']} | {r['decode_ms_p50']:.2f} | "
            f"{r['read_bound_ms']:.2f} | {r['vs_read_bound']:.2f}x | {r['kv_device_bytes'] / 2**30:.2f} | "
            f"{(r['peak_device_bytes'] or 0) / 2**30:.2f} |"
        )
    lines += [
        "",
        "## Targets",
        "",
        "| strategy | over | context | batch | limit | measured | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in result.get("targets", []):
        measured = f"{v['ratio']:.3f}x" if "ratio" in v else v.get("why", "")
        lines.append(
            f"| {v['strategy']} | {v['over']} | {v.get('context', '')} | {v.get('batch', '')} | "
            f"{v['limit']:.2f}x | {measured} | {v['met']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
