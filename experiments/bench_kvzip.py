"""What kvzip's scoring pass costs against a plain prefill of the same prompt. Writes results/kvzip-pass/ by default.

    python experiments/bench_kvzip.py [--model default] [--lengths 384,768,1024] [--rounds 8] [--out DIR]

kvzip (kvcompress/retention/kvzip.py) reads the prompt a second time after prefilling it, scoring each stored token
by the most attention the copy gives it. Each round times, one after the other on the same random prompt, a prefill
into a `full` cache and a prefill into a `kvzip` cache (which includes the scoring pass and the eviction after it).
The pass costs (kvzip TTFT / full TTFT - 1) prefills; the interval resamples whole rounds, paired.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from kvcompress.evals.cost import calibrate
from kvcompress.evals.latency import time_generation
from kvcompress.evals.stats import rounds_ratio_interval

import kvcompress
from kvcompress.provenance import device_name, provenance, provenance_lines
from kvcompress.units import parse_tokens


def measure(model, length: int, rounds: int, strategy: str) -> dict:
    """TTFT of `full` and of `strategy` over one random prompt of `length` tokens, `rounds` paired rounds after a
    warm-up round; the scoring pass in prefills with its interval."""
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=generator).to(model.device)
    times = {"full": [], strategy: []}
    for round_ in range(rounds + 1):
        for name in times:
            with kvcompress.make_cache(model, name) as cache:
                ttft = time_generation(model, ids, cache, 0)["ttft_s"]
            if round_:  # the first round warms up allocations and kernels
                times[name].append(ttft)
    ratio, low, high = rounds_ratio_interval([[t] for t in times["full"]], [[t] for t in times[strategy]])
    return {
        "length": length,
        "full_ttft_s": [round(t, 4) for t in times["full"]],
        "kvzip_ttft_s": [round(t, 4) for t in times[strategy]],
        "pass_in_prefills": round(ratio - 1, 3),
        "pass_interval": [round(low - 1, 3), round(high - 1, 3)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--lengths", default="384,768,1024")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--strategy", default="kvzip:budget=256")
    parser.add_argument("--out", default="results/runs/kvzip-pass")
    args = parser.parse_args()
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    out = Path(args.out)
    if (out / "kvzip_pass.json").exists():
        raise SystemExit(f"--out {str(out)!r} already holds kvzip_pass.json: choose another folder or remove it")
    out.mkdir(parents=True, exist_ok=True)
    model, _ = kvcompress.load_model(args.model)
    meta = provenance(args.model, model.device)
    meta["calibration"] = calibrate(model, device_name(model.device)).record()
    rows = []
    for length in (parse_tokens(text) for text in args.lengths.split(",")):
        rows.append(measure(model, length, args.rounds, args.strategy))
        print(f"{length} tokens: scoring pass {rows[-1]['pass_in_prefills']:.2f} prefills {rows[-1]['pass_interval']}")
    (out / "kvzip_pass.json").write_text(json.dumps({"meta": meta, "strategy": args.strategy, "rows": rows}) + "\n")
    lines = [
        f"# {args.strategy}: the scoring pass against a plain prefill",
        "",
        *provenance_lines(meta),
        f"- calibration: 1k-token prefill {meta['calibration']['prefill_1k_s']:.2f} s on this machine",
        "",
        "| prompt tokens | full TTFT s (median) | kvzip TTFT s (median) | scoring pass, prefills | 95 % interval |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        full, kvzip = sorted(r["full_ttft_s"]), sorted(r["kvzip_ttft_s"])
        lines.append(
            f"| {r['length']} | {full[len(full) // 2]:.3f} | {kvzip[len(kvzip) // 2]:.3f} | "
            f"{r['pass_in_prefills']:.2f} | {r['pass_interval'][0]:.2f} to {r['pass_interval'][1]:.2f} |"
        )
    (out / "kvzip_pass.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'kvzip_pass.md'}")


if __name__ == "__main__":
    main()
