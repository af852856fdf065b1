"""The eval harness: recall, latency and fidelity cells for every strategy, each appended to records.jsonl as it
finishes; then the report (summary.csv, pressure_transfer.md, plots) from whatever the records hold."""

from __future__ import annotations

import dataclasses
import resource
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..cache import make_cache
from ..models import load_model
from ..provenance import provenance
from ..strategy import parse_strategy
from . import reference_text, text_ids
from .fidelity import compare, step_logits
from .latency import percentile, time_generation
from .records import RecordStore
from .tasks import TASKS, depths, make_case, render, score

# Presets sized for the quick grid: budgets well below its longest context, so eviction is visible.
QUICK_STRATEGIES = ["full", "int8", "fp8", "int4", "window:window=256", "sink:sinks=4,window=252", "full+disk"]


@dataclass
class Thresholds:
    recall_loss_pts: float = 2.0
    decode_latency_pct: float = 15.0
    top1: float = 0.98


@dataclass
class ReportConfig:
    model: str = "default"
    strategies: list[str] = field(default_factory=lambda: list(QUICK_STRATEGIES))
    tasks: list[str] = field(default_factory=lambda: ["passkey", "multikey"])
    lengths: list[int] = field(default_factory=lambda: [512, 1024])
    depths: int = 5
    seeds: int = 1
    max_new_tokens: int = 24
    decode_steps: int = 24
    fidelity_prefill: int = 512
    fidelity_steps: int = 100
    fidelity_text: str | None = None  # a text file; None: the shipped public-domain text
    device: str = "cpu"
    dtype: str | None = "bfloat16"  # KV as GPUs hold it; None keeps the checkpoint's dtype
    sessions: int = 32
    context: int = 32768
    thresholds: Thresholds = field(default_factory=Thresholds)

    def __post_init__(self):
        self.strategies = [str(parse_strategy(s)) for s in self.strategies]  # bad strategies fail before any work
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:  # checked here, not at the cell that needs it, so a run never stops half-way on a typo
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; allowed: {', '.join(TASKS)}")
        if "full" not in self.strategies:
            self.strategies.insert(0, "full")  # every loss is measured against it
        for name, value in (("lengths", min(self.lengths)), ("depths", self.depths), ("seeds", self.seeds),
                            ("sessions", self.sessions), ("context", self.context)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.fidelity_text is not None and not Path(self.fidelity_text).is_file():
            raise ValueError(f"fidelity_text must be a readable text file, got {self.fidelity_text!r}")
        if isinstance(self.thresholds, dict):
            self.thresholds = Thresholds(**self.thresholds)

    @classmethod
    def from_dict(cls, data: dict) -> ReportConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown report setting(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        return cls(**data)


def _is_allocation_failure(err: BaseException) -> bool:
    return isinstance(err, (torch.OutOfMemoryError, MemoryError))


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _guarded(base: dict, cell: Callable[[], dict]) -> dict:
    """Run one cell; running out of memory is an outcome to record (the first signal a fleet shows), not a crash."""
    try:
        return {**base, "outcome": "ok", **cell()}
    except Exception as err:  # noqa: BLE001  (only allocation failures are swallowed)
        if not _is_allocation_failure(err):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {**base, "outcome": "allocation_failure", "error": str(err).splitlines()[0][:300]}


class Harness:
    def __init__(self, config: ReportConfig):
        self.config = config
        self.model, self.tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
        if self.tokenizer is None:
            raise ValueError(f"model {config.model!r} has no tokenizer: recall tasks need one")
        self._full_logits: torch.Tensor | None = None
        self._text_token_ids: torch.Tensor | None = None

    def cells(self) -> list[tuple[dict, Callable[[], dict]]]:
        c = self.config
        cells = []
        for task in c.tasks:
            for length in c.lengths:
                for depth in depths(c.depths):
                    for seed in range(c.seeds):
                        for strategy in c.strategies:
                            base = {"kind": "recall", "strategy": strategy, "task": task, "length": length,
                                    "depth": depth, "seed": seed}
                            cells.append((base, lambda s=strategy, t=task, l=length, d=depth, e=seed:
                                          self.recall(s, t, l, d, e)))
        for length in c.lengths:
            for strategy in c.strategies:
                cells.append(({"kind": "latency", "strategy": strategy, "length": length},
                              lambda s=strategy, l=length: self.latency(s, l)))
        for strategy in c.strategies:
            cells.append(({"kind": "fidelity", "strategy": strategy}, lambda s=strategy: self.fidelity(s)))
        return cells

    def _sync_peak(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def _peak(self) -> int | None:
        return torch.cuda.max_memory_allocated() if self.model.device.type == "cuda" else None

    @torch.no_grad()
    def recall(self, strategy: str, task: str, length: int, depth: float, seed: int) -> dict:
        case = make_case(task, self.tokenizer, length, depth, seed)
        context, question = render(self.tokenizer, case.messages, case.question)
        device = self.model.device
        with make_cache(self.model, strategy) as cache:
            record = self._answer(cache, context, question, device)
        return {"answer": case.answer, "correct": score(case.answer, record["output"]), **record}

    def _answer(self, cache, context: list[int], question: list[int], device) -> dict:
        self._sync_peak()
        self.model(input_ids=torch.tensor([context], device=device), cache=cache, use_cache=True)
        prefill = {"kv_bytes_prefill": cache.kv_bytes(), "peak_device_bytes_prefill": self._peak()}
        self._sync_peak()
        ids = torch.tensor([context + question], device=device)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache,
                                  max_new_tokens=self.config.max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.eos_token_id)
        output = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        return {"prompt_tokens": ids.shape[1], "output": output, **prefill, "kv_bytes_final": cache.kv_bytes(),
                "peak_device_bytes_decode": self._peak(), "stored_tokens": cache.stored_tokens(),
                "seen_tokens": cache.get_seq_length(), "process_peak_rss_bytes": _peak_rss_bytes()}

    def _text_ids(self, length: int) -> torch.Tensor:
        if self._text_token_ids is None:  # tokenized once, sliced for every latency and fidelity cell
            path = self.config.fidelity_text
            text = Path(path).read_text() if path else reference_text()
            self._text_token_ids = self.tokenizer(text, return_tensors="pt").input_ids[0]
        return text_ids(self._text_token_ids, length).to(self.model.device)

    def latency(self, strategy: str, length: int) -> dict:
        warmup = min(4, self.config.decode_steps // 4)
        steps = self.config.decode_steps + warmup
        with make_cache(self.model, strategy) as cache:
            timing = time_generation(self.model, self._text_ids(length), cache, steps)
        decode = timing["decode_s"][warmup:]
        p50 = statistics.median(decode)
        record = {"ttft_s": timing["ttft_s"], "decode_ms_p50": p50 * 1e3,
                  "decode_ms_p95": percentile(decode, 95) * 1e3, "tokens_per_s": 1 / p50}
        if timing["transfer"]:  # offloading tiers: what one decode step moves, and how long the host waited for it
            per_step = {key: value / steps for key, value in timing["transfer"].items()}
            busy = per_step["transfer_s"] + per_step["disk_s"]
            record.update(moved_bytes_per_step=sum(v for k, v in per_step.items() if k.endswith("_bytes")),
                          transfer_ms_per_step=1e3 * busy, stall_ms_per_step=1e3 * per_step["stall_s"],
                          # the share of copy/I-O time the host did not wait for: hidden behind compute
                          overlap=max(0.0, 1 - per_step["stall_s"] / busy) if busy else None,
                          transfer_per_step=per_step)
        return record

    def fidelity(self, strategy: str) -> dict:
        c = self.config
        ids = self._text_ids(c.fidelity_prefill + c.fidelity_steps)
        if self._full_logits is None:
            self._full_logits = step_logits(self.model, ids, "full", c.fidelity_prefill)
        return compare(self._full_logits, step_logits(self.model, ids, strategy, c.fidelity_prefill))


def run_report(config: ReportConfig | None, out: Path, resume: bool = False, command: list[str] | None = None) -> Path:
    """Run (or finish, with resume=True) every cell into out/records.jsonl, then write the report."""
    from .report import write_report

    out = Path(out)
    if resume:
        store = RecordStore(out / "records.jsonl")
        config = ReportConfig.from_dict(store.meta["config"])
    else:
        meta = provenance(config.model, config.device, command)
        store = RecordStore(out / "records.jsonl", {**meta, "config": dataclasses.asdict(config)})
    harness = Harness(config)
    todo = [(base, cell) for base, cell in harness.cells() if RecordStore.key(base) not in store]
    for base, cell in tqdm(todo, desc="kvcompress report", unit="cell", file=sys.stderr, dynamic_ncols=True):
        store.append(_guarded(base, cell))
    return write_report(out)
