"""Compress once, answer later: what saving a compressed cache and loading it back costs against prefilling the
prompt again. Writes results/runs/reuse/ by default (results/reuse/ holds the committed run).

    python experiments/bench_reuse.py [--model default] [--lengths 1k,4k] [--strategies full,int8,kvzip:ratio=0.5]
                                      [--rounds 3] [--out DIR]

Per strategy and prompt length, in rounds (the strategies in turn, reversed every other round): a re-prefill (the
prompt into a fresh cache, timed to the first token as a server would, `time_generation`), then `cache.save` to a
file in the output folder (seconds, bytes on disk beside `kv_bytes()`), then the restore: `kc.load_cache` and the
first decode step after it (restore-to-first-token). Medians over rounds; the interval of restore against
re-prefill resamples whole rounds, paired. The files go to a temporary folder beside the output, removed after.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from kvcompress.evals import reference_text, text_ids
from kvcompress.evals.cost import calibrate
from kvcompress.evals.latency import time_generation
from kvcompress.evals.stats import rounds_ratio_interval

import kvcompress
from kvcompress.provenance import device_name, provenance, provenance_lines
from kvcompress.strategy import split_strategies
from kvcompress.units import parse_tokens

MB = 1e6


@torch.no_grad()
def one_round(model, ids: torch.Tensor, strategy: str, folder: Path) -> dict:
    """A re-prefill, a save and a restore of `strategy`'s cache over `ids` [1, tokens]."""
    path = folder / "cache.kvc"
    with kvcompress.make_cache(model, strategy, offload_dir=folder) as cache:
        timing = time_generation(model, ids, cache, 1)
        prefill_s = timing["ttft_s"]
        start = time.perf_counter()
        file_bytes = cache.save(path)
        save_s = time.perf_counter() - start
        kv_bytes = sum(cache.kv_bytes().values())
    start = time.perf_counter()
    with kvcompress.load_cache(model, path, offload_dir=folder) as loaded:
        load_s = time.perf_counter() - start
        token = ids[:, -1:]
        model(input_ids=token, cache=loaded, use_cache=True)
        restore_s = time.perf_counter() - start
    path.unlink()
    return {
        "prefill_s": prefill_s,
        "save_s": save_s,
        "load_s": load_s,
        "restore_s": restore_s,
        "file_bytes": file_bytes,
        "kv_bytes": kv_bytes,
    }


def summarize(strategy: str, length: int, rounds: list[dict]) -> dict:
    median = {key: statistics.median(r[key] for r in rounds) for key in ("prefill_s", "save_s", "load_s", "restore_s")}
    ratio, low, high = rounds_ratio_interval([[r["prefill_s"]] for r in rounds], [[r["restore_s"]] for r in rounds])
    file_bytes, kv_bytes = rounds[0]["file_bytes"], rounds[0]["kv_bytes"]
    return {
        "strategy": strategy,
        "length": length,
        **{key: round(value, 4) for key, value in median.items()},
        "file_bytes": file_bytes,
        "kv_bytes": kv_bytes,
        "save_mb_per_s": round(file_bytes / MB / median["save_s"], 1),
        "load_mb_per_s": round(file_bytes / MB / median["load_s"], 1),
        "restore_vs_prefill": round(ratio, 3),
        "restore_vs_prefill_interval": [round(low, 3), round(high, 3)],
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--lengths", default="1k,4k")
    parser.add_argument("--strategies", default="full,int8,kvzip:ratio=0.5")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="results/runs/reuse")
    args = parser.parse_args()
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    out = Path(args.out)
    if (out / "reuse.json").exists():
        raise SystemExit(f"--out {str(out)!r} already holds reuse.json: choose another folder or remove it")
    out.mkdir(parents=True, exist_ok=True)
    strategies = split_strategies(args.strategies)
    model, tokenizer = kvcompress.load_model(args.model)
    meta = provenance(args.model, model.device)
    meta["calibration"] = calibrate(model, device_name(model.device)).record()
    if tokenizer is not None:
        text = tokenizer(reference_text(), return_tensors="pt").input_ids[0]
    else:  # a random-weight model has no tokenizer: random ids
        longest = max(parse_tokens(t) for t in args.lengths.split(","))
        text = torch.randint(0, model.config.vocab_size, (longest,), generator=torch.Generator().manual_seed(0))
    rows = []
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        for length in (parse_tokens(t) for t in args.lengths.split(",")):
            ids = text_ids(text, length).to(model.device)
            kept = {s: [] for s in strategies}
            one_round(model, ids, strategies[0], Path(scratch))  # warm-up
            for round_ in range(args.rounds):
                for strategy in strategies if round_ % 2 == 0 else strategies[::-1]:
                    kept[strategy].append(one_round(model, ids, strategy, Path(scratch)))
            for strategy in strategies:
                rows.append(summarize(strategy, length, kept[strategy]))
                r = rows[-1]
                print(
                    f"{length} tokens, {strategy}: re-prefill {r['prefill_s']:.2f} s, restore {r['restore_s']:.3f} s "
                    f"({r['restore_vs_prefill']:.3f}x), {r['file_bytes'] / MB:.1f} MB on disk"
                )
    (out / "reuse.json").write_text(json.dumps({"meta": meta, "rows": rows}) + "\n")
    lines = [
        "# Saved compressed caches: save, load and restore-to-first-token against a re-prefill",
        "",
        *provenance_lines(meta),
        f"- calibration: 1k-token prefill {meta['calibration']['prefill_1k_s']:.2f} s on this machine",
        "",
        "| tokens | strategy | re-prefill s | save s | load s | restore to 1st token s | restore / re-prefill "
        "(95 % interval) | MB on disk | MB held (kv_bytes) | save MB/s | load MB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        low, high = r["restore_vs_prefill_interval"]
        lines.append(
            f"| {r['length']} | `{r['strategy']}` | {r['prefill_s']:.2f} | {r['save_s']:.3f} | {r['load_s']:.3f} | "
            f"{r['restore_s']:.3f} | {r['restore_vs_prefill']:.3f} ({low:.3f} to {high:.3f}) | "
            f"{r['file_bytes'] / MB:.2f} | {r['kv_bytes'] / MB:.2f} | {r['save_mb_per_s']:.0f} | "
            f"{r['load_mb_per_s']:.0f} |"
        )
    (out / "reuse.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'reuse.md'}")


if __name__ == "__main__":
    main()
