"""kvpress baseline: run NVIDIA kvpress's presses on the prompts our benchmark wrote, on identical token ids.

For every prompt x question placement x press x compression ratio (plus one uncompressed "none" run per prompt and
placement) it prefills under the press, measures the resident KV bytes of the DynamicCache, then greedy-decodes
and scores "answer string appears in the output". One JSON line per run is appended to --out (after a
{"meta": ...} line when the file is new); runs already in the file are skipped, so an interrupted run resumes.

    question=after:  the press compresses context_ids; question_ids are then fed uncompressed (kvpress's protocol).
    question=inside: the press compresses context_ids + question_ids[:-1]; the last question token is then fed.

The prefill follows kvpress's KVPressTextGenerationPipeline: `with press(model): model.model(ids, past_key_values=
DynamicCache())`, then the question is fed with position_ids that continue from the uncompressed length.

This script runs in its own environment, not the project's: kvpress 0.5.5 pins transformers<5.3,>=4.56.
Build it (CPU torch first, so kvpress's torch requirement does not pull a CUDA build):

    python3 -m venv /work/kvpress-venv
    /work/kvpress-venv/bin/pip install torch==2.13.0
    /work/kvpress-venv/bin/pip install kvpress==0.5.5

Run it (prompts JSONL: case, task, length, depth, seed, context_ids, question_ids, answer):

    /work/kvpress-venv/bin/python experiments/kvpress_baseline.py --prompts results/eviction/v2/prompts.jsonl \
        --out OUT/kvpress.jsonl --presses streaming_llm,snapkv,tova,knorm,expected_attention \
        --ratios 0.5,0.75 --questions after,inside [--max-new-tokens 24] [--limit N]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import kvpress
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

PRESSES = {
    "streaming_llm": kvpress.StreamingLLMPress,
    "snapkv": kvpress.SnapKVPress,
    "tova": kvpress.TOVAPress,
    "knorm": kvpress.KnormPress,
    "expected_attention": kvpress.ExpectedAttentionPress,
}
QUESTIONS = ("after", "inside")
DEFAULT_MODEL = "/root/.cache/kvcompress/smollm2-135m-instruct"
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line; bad press names, ratios or placements exit with a clear message."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--presses", default=",".join(PRESSES))
    p.add_argument("--ratios", default="0.5,0.75", help="kvpress compression_ratio: fraction of tokens REMOVED")
    p.add_argument("--questions", default="after,inside")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--model", default=DEFAULT_MODEL, help="a local model directory (no hub access)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--attn",
        default="sdpa",
        choices=["sdpa", "eager"],
        help="sdpa: SnapKV/TOVA recompute their window attention; eager: they read the layer's weights",
    )
    args = p.parse_args(argv)
    args.presses = [s.strip() for s in args.presses.split(",") if s.strip()]
    unknown = [s for s in args.presses if s not in PRESSES]
    if unknown:
        p.error(f"unknown press {', '.join(unknown)}; allowed: {', '.join(PRESSES)}")
    try:
        args.ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        p.error(f"--ratios must be comma-separated numbers, got {args.ratios!r}")
    bad = [r for r in args.ratios if not 0 <= r < 1]
    if bad:
        p.error(f"compression ratio must be in [0, 1) (fraction removed), got {bad}")
    args.questions = [s.strip() for s in args.questions.split(",") if s.strip()]
    if not args.questions or any(q not in QUESTIONS for q in args.questions):
        p.error(f"--questions must be a comma-separated subset of {', '.join(QUESTIONS)}, got {args.questions}")
    return args


def load_prompts(path: Path, limit: int | None) -> list[dict]:
    """Read the prompts JSONL, checking every line has the fields the runs need."""
    need = {"case", "task", "length", "depth", "seed", "context_ids", "question_ids", "answer"}
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "meta" in row:  # the provenance line bench_eviction.py writes first
            continue
        if missing := need - row.keys():
            sys.exit(f"{path}:{n}: missing fields {sorted(missing)}")
        if len(row["question_ids"]) < 1 or len(row["context_ids"]) < 1:
            sys.exit(f"{path}:{n}: empty context_ids or question_ids")
        prompts.append(row)
    return prompts[:limit] if limit is not None else prompts


def git_state() -> dict:
    """The commit of the repo this script lives in, and whether its work tree is dirty."""

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()

    return {"git_commit": git("rev-parse", "HEAD") or None, "git_dirty": bool(git("status", "--porcelain"))}


def meta(args: argparse.Namespace) -> dict:
    """The provenance line written before the first record of a new file."""
    return {
        "command": " ".join(["python", *sys.argv]),
        "argv": sys.argv,
        "kvpress": version("kvpress"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "attn_implementation": args.attn,
        "max_new_tokens": args.max_new_tokens,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **git_state(),
    }


def read_done(out: Path) -> dict[tuple, dict]:
    """Records already in --out, keyed by (case, question, press, ratio)."""
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if "case" in row:
                done[(row["case"], row["question"], row["press"], float(row["compression_ratio"]))] = row
    return done


def load_model(args: argparse.Namespace):
    """Model and tokenizer from a local directory."""
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn)
    model.to(args.device).eval()
    return model, AutoTokenizer.from_pretrained(args.model)


def kv_bytes(cache: DynamicCache) -> int:
    """Resident bytes of every key and value tensor in the cache, all layers."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def prefill(model, ids: list[int], press) -> tuple[DynamicCache, int]:
    """Prefill `ids` (without the LM head) under the press, as kvpress's pipeline does; returns the cache and its
    KV bytes right after compression."""
    cache = DynamicCache()
    x = torch.tensor([ids], device=model.device)
    with press(model) if press is not None else contextlib.nullcontext():
        model.model(input_ids=x, past_key_values=cache)
    return cache, kv_bytes(cache)


def decode(model, tokenizer, cache: DynamicCache, feed: list[int], start: int, answer: str, max_new_tokens: int) -> str:
    """Feed the remaining prompt tokens at positions start.. (the uncompressed length), then greedy-decode until
    EOS, max_new_tokens, or the answer string appears in the decoded output."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    ids = torch.tensor([feed], device=model.device)
    pos = torch.arange(start, start + len(feed), device=model.device).unsqueeze(0)
    out: list[int] = []
    text = ""
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, past_key_values=cache, position_ids=pos, logits_to_keep=1).logits
        tok = int(logits[0, -1].argmax())
        if tok in eos:
            break
        out.append(tok)
        text = tokenizer.decode(out, skip_special_tokens=True)
        if answer in text:
            break
        ids = torch.tensor([[tok]], device=model.device)
        pos = pos[:, -1:] + 1
    return text


@torch.no_grad()
def run_one(model, tokenizer, prompt: dict, question: str, press_name: str, ratio: float, max_new_tokens: int) -> dict:
    """One prefill-compress-decode run; the record lacks kv_fraction (filled in by the caller)."""
    ctx, q = prompt["context_ids"], prompt["question_ids"]
    first, feed = (ctx, q) if question == "after" else (ctx + q[:-1], q[-1:])
    press = None if press_name == "none" else PRESSES[press_name](compression_ratio=ratio)
    t0 = time.perf_counter()
    cache, nbytes = prefill(model, first, press)
    output = decode(model, tokenizer, cache, feed, len(first), prompt["answer"], max_new_tokens)
    seconds = time.perf_counter() - t0
    return {
        **{k: prompt[k] for k in ("case", "task", "length", "depth", "seed")},
        "question": question,
        "press": press_name,
        "compression_ratio": ratio,
        "correct": prompt["answer"] in output,
        "output": output,
        "kv_bytes": nbytes,
        "prompt_tokens": len(ctx) + len(q),
        "seconds": round(seconds, 3),
    }


def main(argv: list[str] | None = None) -> None:
    """Run every missing (prompt, placement, press, ratio), the uncompressed "none" run first for kv_fraction."""
    args = parse_args(argv)
    prompts = load_prompts(args.prompts, args.limit)
    done = read_done(args.out)
    model, tokenizer = load_model(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new_file = not args.out.exists() or args.out.stat().st_size == 0
    with args.out.open("a") as f:

        def write(row: dict) -> None:
            f.write(json.dumps(row) + "\n")
            f.flush()

        if new_file:
            write({"meta": meta(args)})
        runs = [("none", 0.0)] + [(p, r) for p in args.presses for r in args.ratios]
        for prompt in prompts:
            for question in args.questions:
                full = None
                for press_name, ratio in runs:
                    key = (prompt["case"], question, press_name, ratio)
                    if key in done:
                        row = done[key]
                    else:
                        row = run_one(model, tokenizer, prompt, question, press_name, ratio, args.max_new_tokens)
                    if press_name == "none":
                        full = row["kv_bytes"]
                    if key not in done:
                        row["kv_fraction"] = round(row["kv_bytes"] / full, 6)
                        write(row)
                        print(
                            f"{row['case']} {question} {press_name}@{ratio}: correct={row['correct']} "
                            f"kv_fraction={row['kv_fraction']} {row['seconds']}s {row['output']!r}",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
