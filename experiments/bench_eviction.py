"""Score-based eviction on the default model: recall and needle survival for every member at 50 % and 25 % of the
full cache's measured KV bytes, both question placements, against `full` and StreamingLLM (`sink`) on the same
prompts; and, where the output folder has a kvpress.jsonl, against kvpress's presses on the same token ids.

    python experiments/bench_eviction.py                       # -> results/eviction/ (resumes if interrupted)
    python experiments/bench_eviction.py --members 'kvzip;tova:kernel=7' --cases 40 --out results/runs/eviction-kvzip
    python experiments/bench_eviction.py --cases 10 --out /tmp/e   # a quick look

The committed runs and their commands: results/README.md.

It is one `kvcompress report` run (records, table, plots, provenance) over a grid sized for the question, plus
prompts.jsonl (the exact token ids, for experiments/kvpress_baseline.py) and eviction.md: recall per member and
budget with its paired 95 % interval against `full`, needle survival, measured bytes, and the issue's targets.
Budgets are set from measured bytes: each member's `ratio` is the fraction of full's bytes per token it may hold
(its position and score bookkeeping count), and sink's window the same at the grid's length.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from kvcompress.evals import stats
from kvcompress.evals.cases import render
from kvcompress.evals.config import ReportConfig, configs_of
from kvcompress.evals.records import RecordStore
from kvcompress.evals.run import run_report
from kvcompress.evals.tasks import depths, make_case

from kvcompress import bytes_per_token, load_model, make_cache, parse_strategy
from kvcompress.dtypes import parse_dtype
from kvcompress.prefill import Prefill
from kvcompress.provenance import provenance

MEMBERS = ["h2o", "tova", "snapkv", "pyramid", "knorm", "adakv", "kvzip"]
KVPRESS_PRESSES = ["streaming_llm", "snapkv", "tova", "knorm", "expected_attention"]


def with_ratio(member: str, ratio: float) -> str:
    """`member` ("tova", or with parameters: "tova:observe=8") keeping `ratio` of the tokens seen."""
    return f"{member}{',' if ':' in member else ':'}ratio={ratio:.4f}"


def strategies_at(fraction: float, members: list[str], length: int, model_config, kv_dtype) -> dict[str, str]:
    """Strategy strings whose bytes are `fraction` of full's by the analytic size (tested equal to the measured one
    for every member but adakv, whose padding `calibrated` measures): member -> strategy."""
    full = bytes_per_token(model_config, "full", kv_dtype)
    chosen = {}
    for member in members:
        ratio = fraction * full / bytes_per_token(model_config, with_ratio(member, 0.5), kv_dtype)
        chosen[member] = with_ratio(member, ratio)
    sink_tokens = math.floor(fraction * length * full / bytes_per_token(model_config, "sink", kv_dtype))
    chosen["sink"] = f"sink:sinks=4,window={sink_tokens - 4}"
    return chosen


def calibrated(strategy: str, fraction: float, model, tokenizer, length: int) -> str:
    """adakv pads each layer's heads to the widest, so its measured bytes exceed its nominal ratio: scale the ratio
    by what one probe case (passkey, middle depth, seed 99: not a graded case) measures, so that the grid compares
    members at equal measured bytes."""
    case = make_case("passkey", tokenizer, length, 0.5, 99)
    context = torch.tensor([render(tokenizer, case.messages, case.question)[0]])
    prefill = Prefill.of(model, context, attention=True)
    measured = {}
    for name in ("full", strategy):
        with make_cache(model, name) as cache:
            prefill.fill(model, cache)
            measured[name] = cache.kv_bytes()["device"]
    member, _, params = strategy.partition(":")
    ratio = float(params.split("ratio=")[1].split(",")[0])
    return f"{member}:ratio={ratio * fraction * measured['full'] / measured[strategy]:.4f}"


def write_prompts(config: ReportConfig, tokenizer, path: Path, meta: dict) -> None:
    """The token ids every case of the grid feeds the model, for a peer toolkit to run on the same prompts; the first
    line is the provenance."""
    with path.open("w") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        for task in config.tasks:
            for length in config.lengths:
                for depth in depths(config.depths):
                    for seed in range(config.seeds):
                        case = make_case(task, tokenizer, length, depth, seed)
                        context, question = render(tokenizer, case.messages, case.question)
                        f.write(
                            json.dumps(
                                {
                                    "case": f"{task}-{length}-{depth}-{seed}",
                                    "task": task,
                                    "length": length,
                                    "depth": depth,
                                    "seed": seed,
                                    "context_ids": context,
                                    "question_ids": question,
                                    "answer": case.answer,
                                }
                            )
                            + "\n"
                        )


def _paired(full: dict, mine: dict) -> stats.PairedRecall | None:
    keys = sorted(set(full) & set(mine))
    return stats.paired_recall([full[k] for k in keys], [mine[k] for k in keys]) if keys else None


def evaluate(out: Path, fractions: dict[str, float]) -> str:
    """eviction.md: recall, paired loss against full, needle survival and measured bytes per (budget, placement,
    strategy), then the targets."""
    store = RecordStore(out / "records.jsonl")
    recall = [r for r in store.records if r.get("kind") == "recall" and r.get("outcome") == "ok"]
    by_cell: dict[tuple[str, str], dict[tuple, dict]] = {}
    for r in recall:
        by_cell.setdefault((r["strategy"], r["question"]), {})[(r["task"], r["length"], r["depth"], r["seed"])] = r
    questions = sorted({q for _, q in by_cell})
    lines = [
        "| budget | question | strategy | recall | loss vs full [95% CI] | needle kept | measured bytes vs full |",
        "|---|---|---|---|---|---|---|",
    ]
    best: dict[tuple[str, str], tuple[float, str]] = {}
    sink: dict[tuple[str, str], float] = {}
    for question in questions:
        full = by_cell.get(("full", question), {})
        full_bytes = {k: r["kv_bytes_prefill"]["device"] for k, r in full.items()}
        for strategy, label in sorted(fractions.items(), key=lambda item: (item[1], item[0])):
            mine = by_cell.get((strategy, question), {})
            if not mine:
                continue
            paired = _paired({k: r["correct"] for k, r in full.items()}, {k: r["correct"] for k, r in mine.items()})
            share = [r["kv_bytes_prefill"]["device"] / full_bytes[k] for k, r in mine.items() if k in full_bytes]
            survival = [r["needle_survival"] for r in mine.values()]
            recall_pct = 100 * sum(r["correct"] for r in mine.values()) / len(mine)
            lines.append(
                f"| {label} | {question} | `{strategy}` | {recall_pct:.1f}% (n={len(mine)}) | "
                f"{paired.loss_pts:+.1f} pts [{paired.low_pts:+.1f}, {paired.high_pts:+.1f}] | "
                f"{100 * sum(survival) / len(survival):.0f}% | {100 * sum(share) / len(share):.1f}% |"
            )
            if strategy.startswith("sink"):
                sink[label, question] = recall_pct
            elif strategy != "full":
                best[label, question] = max(best.get((label, question), (-1.0, "")), (recall_pct, strategy))
    lines += by_seed(by_cell, questions, fractions)
    lines += kvpress_comparison(out, by_cell, fractions, best)
    full_recall = {
        q: 100
        * sum(r["correct"] for r in by_cell.get(("full", q), {}).values())
        / max(1, len(by_cell.get(("full", q), {})))
        for q in questions
    }
    lines += ["", "Targets (issue 11):"]
    for (label, question), (pct, strategy) in sorted(best.items()):
        if label.startswith("50%"):
            lines.append(
                f"- {label}, question {question}: best member `{strategy}` {pct:.1f}% vs full "
                f"{full_recall[question]:.1f}%: loses {full_recall[question] - pct:.1f} pts (target <= 5): "
                + ("met" if full_recall[question] - pct <= 5 else "not met")
            )
        else:
            floor = sink.get((label, question))
            lines.append(
                f"- {label}, question {question}: best member `{strategy}` {pct:.1f}% vs sink "
                f"{floor:.1f}% (target >= 2x): " + ("met" if floor is not None and pct >= 2 * floor else "not met")
            )
    return "\n".join(lines) + "\n"


def by_seed(by_cell: dict, questions: list[str], fractions: dict[str, str]) -> list[str]:
    """Correct answers per seed (each seed is a fresh set of needles and filler at every task and depth): a setting
    chosen by looking at some seeds is checked on the others."""
    seeds = sorted({key[3] for cases in by_cell.values() for key in cases})
    rows = [
        "",
        "Correct answers by seed (tasks and depths pooled):",
        "",
        "| question | strategy | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
        "|---|---|" + "---|" * len(seeds),
    ]
    for question in questions:
        for strategy in sorted(fractions, key=lambda name: (fractions[name], name)):
            cases = by_cell.get((strategy, question), {})
            if cases:
                counts = [[r["correct"] for key, r in cases.items() if key[3] == seed] for seed in seeds]
                rows.append(f"| {question} | `{strategy}` | " + " | ".join(f"{sum(c)}/{len(c)}" for c in counts) + " |")
    return rows


def grid(args: argparse.Namespace) -> tuple[ReportConfig, dict[str, str]]:
    """The report config of the grid, and each strategy's budget label."""
    model, tokenizer = load_model("default")
    kv_dtype = parse_dtype(ReportConfig.default("kv_dtype"))
    fractions: dict[str, str] = {"full": "100%"}
    for fraction in map(float, args.fractions.split(",")):
        for strategy in strategies_at(fraction, args.members.split(";"), args.length, model.config, kv_dtype).values():
            if strategy.startswith("adakv"):
                strategy = calibrated(strategy, fraction, model, tokenizer, args.length)
            fractions[str(parse_strategy(strategy))] = f"{fraction:.0%} of full's bytes"
    config = ReportConfig(
        strategies=list(fractions),
        tasks=args.tasks.split(","),
        lengths=[args.length],
        depths=min(10, args.cases),
        seeds=max(1, args.cases // 10),
        questions=args.questions.split(","),
        max_new_tokens=args.max_new_tokens,
        # one case at a time: each case's bytes are its own (a batch pads a ragged member such as
        # adakv to the largest head of all its rows, so a case's share of the batch's bytes exceeds its own)
        recall_batch=1,
        kv_budget=None,  # recall at matched bytes only
    )
    return config, fractions


def kvpress_comparison(out: Path, by_cell: dict, fractions: dict[str, str], best: dict) -> list[str]:
    """kvpress's presses on the same token ids (experiments/kvpress_baseline.py, its own environment) against our best
    member at the same share of full's bytes, paired case by case; [] when kvpress.jsonl is absent."""
    path = out / "kvpress.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    meta = json.loads(lines[0])["meta"]
    runs: dict[tuple, dict[tuple, dict]] = {}
    for line in lines[1:]:
        r = json.loads(line)
        runs.setdefault((r["press"], r["compression_ratio"], r["question"]), {})[
            (r["task"], r["length"], r["depth"], r["seed"])
        ] = r
    command = " ".join(["python", *meta["argv"]])
    rows = [
        "",
        f"kvpress {meta['kvpress']} (transformers {meta['transformers']}, its KV in {meta['dtype']}) on the "
        f"same prompts, by `{command}` in its own environment (see that script's docstring); `ours - press` "
        "pairs each case with our best member at the same share of bytes:",
        "",
        "| press | kept | question | recall | measured bytes vs its full | best member | ours - press [95% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for (press, ratio, question), cases in sorted(runs.items()):
        label = f"{1 - ratio:.0%} of full's bytes"
        recall_pct = 100 * sum(r["correct"] for r in cases.values()) / len(cases)
        share = 100 * sum(r["kv_fraction"] for r in cases.values()) / len(cases)
        if press == "none" or (label, question) not in best:
            rows.append(
                f"| {press} | {1 - ratio:.0%} | {question} | {recall_pct:.1f}% (n={len(cases)}) | {share:.1f}% | | |"
            )
            continue
        strategy = best[label, question][1]
        ours = by_cell.get((strategy, question), {})
        paired = _paired({k: r["correct"] for k, r in cases.items()}, {k: r["correct"] for k, r in ours.items()})
        rows.append(
            f"| {press} | {1 - ratio:.0%} | {question} | {recall_pct:.1f}% (n={len(cases)}) | {share:.1f}% | "
            f"`{strategy}` | {-paired.loss_pts:+.1f} pts [{-paired.high_pts:+.1f}, {-paired.low_pts:+.1f}] |"
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/eviction")
    p.add_argument(
        "--cases",
        type=int,
        default=20,
        help="cases per task (10 depths x cases/10 seeds); a cell (member, budget, placement) pools the tasks",
    )
    p.add_argument("--tasks", default="passkey,multikey,vartrack")
    p.add_argument("--length", type=int, default=512, help="context tokens (where the default model recalls)")
    p.add_argument("--fractions", default="0.5,0.25", help="fractions of full's measured KV bytes")
    p.add_argument(
        "--members",
        default=";".join(MEMBERS),
        help="members separated by ';', each with parameters if any (tova;tova:observe=8)",
    )
    p.add_argument("--questions", default="after,inside")
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = out / "records.jsonl"
    command = ["python", "experiments/bench_eviction.py", *(argv if argv is not None else sys.argv[1:])]
    if records.is_file():  # resume: the grid (and its calibrated budgets) is the one the records were made with
        config = configs_of(RecordStore(records).meta)[0]
        fractions = json.loads((out / "budgets.json").read_text())["budgets"]
    else:
        config, fractions = grid(args)
        meta = provenance(config.model, config.device, command)
        (out / "budgets.json").write_text(json.dumps({"meta": meta, "budgets": fractions}, indent=1) + "\n")
        write_prompts(config, load_model("default")[1], out / "prompts.jsonl", meta)
    run_report(config, out, resume=records.is_file(), command=command)
    write_summary(out, fractions, command)


def write_summary(out: Path, fractions: dict[str, str], command: list[str]) -> None:
    summary = evaluate(out, fractions)
    (out / "eviction.md").write_text(
        "# Score-based eviction on the default model\n\n"
        f"Command: `{' '.join(command)}`; provenance in records.jsonl's first line and "
        "pressure_transfer.md.\n\n" + summary
    )
    print(summary)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
