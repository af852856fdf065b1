"""Step costs for the simulator (`kvcompress simulate --step-costs`): the wall time of one decode step by batch and
context, and of a one-row prefill by prompt length, per strategy, on this machine. Writes results/runs/steps/ by
default (results/steps/ holds the committed run).

    python experiments/bench_steps.py [--model default] [--strategies full,int8] [--batches 1,2,4,8]
                                      [--contexts 256,512,1024] [--prompts 256,512,1024] [--rounds 3] [--steps 5]
                                      [--out DIR]

Decode, per strategy, batch and context: a fresh cache, `make_cache(model, strategy, batch_size=batch)`, takes
`batch` rows of `context` tokens through its layers' own update (the prompt's K/V computed once per run by a plain
prefill of the longest context, each row the same prefix; a score-based retention, which keeps what attention picks,
is prefilled by the model instead), then one untimed decode step and `--steps` timed ones. Prefill, per strategy and
prompt length: a fresh cache takes one row's prompt, timed to the first token as a server would (`time_generation`).
Every cell once as a warm-up, then in rounds, the strategies in turn, reversed every other round. Each figure is the
median of every round's samples; its 95 % interval resamples whole rounds (a round's steps share its cache and the
machine's minute, so they are not independent draws).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from kvcompress.evals.cost import calibrate
from kvcompress.evals.latency import time_generation
from transformers import DynamicCache

import kvcompress
from kvcompress.provenance import device_name, provenance, provenance_lines
from kvcompress.simulator import STEPS_FILE
from kvcompress.strategy import parse_strategy, split_strategies
from kvcompress.units import parse_tokens

RESAMPLES = 2000


def numbers(text: str) -> list[int]:
    values = sorted({parse_tokens(t) for t in text.split(",")})
    if values[0] < 1:
        raise SystemExit(f"every value must be a positive number, got {text!r}")
    return values


def median_interval(rounds: list[list[float]], seed: int = 0) -> tuple[float, float, float]:
    """The median of every sample of every round, and its 95 % bootstrap percentile interval resampling whole rounds
    (a single round's interval is its own median)."""
    arrays = [np.asarray(r, dtype=float) for r in rounds]
    rng = np.random.default_rng(seed)
    medians = [
        np.median(np.concatenate([arrays[i] for i in rng.integers(0, len(arrays), len(arrays))]))
        for _ in range(RESAMPLES)
    ]
    low, high = np.percentile(medians, [2.5, 97.5])
    return float(np.median(np.concatenate(arrays))), float(low), float(high)


@torch.no_grad()
def prompt_kv(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values) of a plain prefill of `ids` [1, tokens]: any prefix of it is that prefix's."""
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in cache.layers]


@torch.no_grad()
def decode_steps(model, kv, ids, strategy: str, batch: int, context: int, steps: int, folder: Path) -> dict:
    """`steps` timed decode steps of `batch` rows over `context` tokens under `strategy` (after one untimed step)."""
    with kvcompress.make_cache(
        model, strategy, batch_size=batch, max_tokens=context + steps + 1, offload_dir=folder
    ) as cache:
        if parse_strategy(strategy).retention.seam:  # it keeps what the prompt's attention picks: prefill for real
            model(input_ids=ids[:, :context].expand(batch, -1), cache=cache, use_cache=True, logits_to_keep=1)
        else:
            for layer, (keys, values) in zip(cache.layers, kv):
                layer.update(
                    keys[:, :, :context].expand(batch, -1, -1, -1), values[:, :, :context].expand(batch, -1, -1, -1)
                )
        token = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
        times = []
        for _ in range(steps + 1):
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            start = time.perf_counter()
            model(input_ids=token, cache=cache, use_cache=True)
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            times.append(time.perf_counter() - start)
        return {"step_s": times[1:], "kv_bytes": sum(cache.kv_bytes().values())}


@torch.no_grad()
def prefill(model, ids: torch.Tensor, strategy: str, tokens: int, folder: Path) -> float:
    """Seconds to the first token of a one-row `tokens`-token prompt into a fresh `strategy` cache."""
    with kvcompress.make_cache(model, strategy, max_tokens=tokens + 1, offload_dir=folder) as cache:
        return time_generation(model, ids[:, :tokens], cache, 0)["ttft_s"]


def summarize(name: str, rounds: list[list[float]]) -> dict:
    """`name` (the median), `name`_interval and the rounds' samples."""
    median, low, high = median_interval(rounds)
    samples = [[round(t, 6) for t in r] for r in rounds]
    return {name: round(median, 6), f"{name}_interval": [round(low, 6), round(high, 6)], "rounds": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--strategies", default="full,int8")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--contexts", default="256,512,1024")
    parser.add_argument("--prompts", default="256,512,1024")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed decode steps per cell and round")
    parser.add_argument("--out", default="results/runs/steps")
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1:
        raise SystemExit(f"--rounds and --steps must be >= 1, got {args.rounds} and {args.steps}")
    out = Path(args.out)
    if (out / STEPS_FILE).exists():
        raise SystemExit(f"--out {str(out)!r} already holds {STEPS_FILE}: choose another folder or remove it")
    out.mkdir(parents=True, exist_ok=True)
    strategies = split_strategies(args.strategies)
    batches, contexts, prompts = numbers(args.batches), numbers(args.contexts), numbers(args.prompts)
    model, _ = kvcompress.load_model(args.model)
    meta = provenance(args.model, model.device)
    meta["calibration"] = calibrate(model, device_name(model.device)).record()
    longest = max(contexts + prompts)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, longest), generator=generator).to(model.device)
    kv = prompt_kv(model, ids[:, : max(contexts)])
    cells = [(b, c) for b in batches for c in contexts]
    decode = {(s, b, c): [] for s in strategies for b, c in cells}
    prefills = {(s, n): [] for s in strategies for n in prompts}
    held = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        for round_ in range(-1, args.rounds):  # round -1: the warm-up, not kept
            for strategy in strategies if round_ % 2 == 0 else strategies[::-1]:
                for batch, context in cells:
                    timing = decode_steps(model, kv, ids, strategy, batch, context, args.steps, Path(scratch))
                    if round_ >= 0:
                        decode[strategy, batch, context].append(timing["step_s"])
                        held[strategy, batch, context] = timing["kv_bytes"]
                for tokens in prompts:
                    seconds = prefill(model, ids, strategy, tokens, Path(scratch))
                    if round_ >= 0:
                        prefills[strategy, tokens].append([seconds])
            done = f"round {round_ + 1} of {args.rounds}" if round_ >= 0 else "warm-up"
            print(f"{done} done ({time.perf_counter() - start:.0f} s)", flush=True)
    decode_rows = [
        {"strategy": s, "batch": b, "context": c, **summarize("step_s", decode[s, b, c]), "kv_bytes": held[s, b, c]}
        for s in strategies
        for b, c in cells
    ]
    prefill_rows = [{"strategy": s, "tokens": n, **summarize("prefill_s", prefills[s, n])} for s, n in prefills]
    meta["grid"] = {"batches": batches, "contexts": contexts, "prompts": prompts, "rounds": args.rounds}
    meta["steps_per_cell"] = args.steps
    (out / STEPS_FILE).write_text(json.dumps({"meta": meta, "decode": decode_rows, "prefill": prefill_rows}) + "\n")
    (out / "steps.md").write_text("\n".join(markdown(meta, decode_rows, prefill_rows)) + "\n")
    print(f"wrote {out / STEPS_FILE} and {out / 'steps.md'} in {time.perf_counter() - start:.0f} s")


def markdown(meta: dict, decode_rows: list[dict], prefill_rows: list[dict]) -> list[str]:
    grid = meta["grid"]
    lines = [
        "# Step costs: a decode step by batch and context, a prefill by prompt length",
        "",
        *provenance_lines(meta),
        f"- calibration: 1k-token prefill {meta['calibration']['prefill_1k_s']:.2f} s on this machine "
        f"({meta['calibration']['compute_dtype']})",
        f"- medians over {grid['rounds']} rounds ({meta['steps_per_cell']} decode steps per cell and round), "
        "[95 % interval resampling rounds]",
        "",
        "## Decode step, ms",
        "",
        "| strategy | batch | " + " | ".join(f"context {c}" for c in grid["contexts"]) + " |",
        "|---|---|" + "---|" * len(grid["contexts"]),
    ]
    by_cell = {(r["strategy"], r["batch"], r["context"]): r for r in decode_rows}
    for strategy in dict.fromkeys(r["strategy"] for r in decode_rows):
        for batch in grid["batches"]:
            cells = []
            for context in grid["contexts"]:
                r = by_cell[strategy, batch, context]
                low, high = r["step_s_interval"]
                cells.append(f"{1e3 * r['step_s']:.1f} [{1e3 * low:.1f}, {1e3 * high:.1f}]")
            lines.append(f"| `{strategy}` | {batch} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Prefill to the first token (one row), s",
        "",
        "| strategy | " + " | ".join(f"{n} tokens" for n in grid["prompts"]) + " |",
        "|---|" + "---|" * len(grid["prompts"]),
    ]
    by_prompt = {(r["strategy"], r["tokens"]): r for r in prefill_rows}
    for strategy in dict.fromkeys(r["strategy"] for r in prefill_rows):
        cells = []
        for tokens in grid["prompts"]:
            r = by_prompt[strategy, tokens]
            low, high = r["prefill_s_interval"]
            cells.append(f"{r['prefill_s']:.3f} [{low:.3f}, {high:.3f}]")
        lines.append(f"| `{strategy}` | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
