"""What a report run measures: the one place its settings and their defaults live (the CLI's flags, sweep files
and resumed runs all build a ReportConfig)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..accounting import expected_kv_bytes
from ..dtypes import WEIGHTS, parse_dtype
from ..models import load_config
from ..planner import parse_memory
from ..strategy import parse_strategy
from ..units import parse_token_list, parse_tokens
from .cases import CASES
from .tasks import FOLLOWUP_TASKS, TASKS

AUTO_BUDGET = "auto"  # a KV budget sized to the run: `full` holds a few sessions of its longest latency length
AUTO_SESSIONS = 4  # sessions of `full` an automatic budget is sized for (its measured transients may leave room for
# one fewer)

QUESTIONS = ("after", "inside")  # the question arrives after the context was compressed, or inside the prompt
# how a follow-up question meets the compressed context: `reuse`, the context as it was stored after the first
# prompt (the previous question's answer dropped, as a server reusing a cached document); `chat`, one conversation
# (earlier questions and answers stay, eviction goes on)
MODES = ("reuse", "chat")

# The main job's strategies, sized with ReportConfig's defaults to run within ten minutes on a 2-core AVX2 laptop:
# budgets well below the grid's longest context, so eviction is visible; one member per question a user asks first
# (a codec that halves the KV, a streaming window with sinks, the score-based member that needs no second pass over
# the prompt).
QUICK_STRATEGIES = [
    "full",
    "int8",
    "sink:sinks=4,window=252",
    "tova:kernel=7,budget=256",
]
# `--strategies wide`: the quick grid and the members it leaves out for time: int4 and fp8, a window without sinks,
# kvzip (whose scoring pass re-reads the prompt), and the disk tier.
STRATEGY_SETS = {
    "quick": QUICK_STRATEGIES,
    "wide": [*QUICK_STRATEGIES, "int4", "fp8", "window:window=256", "kvzip:budget=256", "full+disk"],
}


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
    lengths: list[int] = field(default_factory=lambda: [384, 768])
    depths: int = 5
    seeds: int = 3  # with 2 tasks x 2 lengths x 5 depths: 60 recall cases per strategy
    max_new_tokens: int = 18  # the default model's correct answers take 10 (passkey) and 15 tokens (multikey)
    recall_batch: int = 16  # recall cases of one task and length run as one left-padded batch of up to this many rows
    decode_steps: int = 8
    # latency cells' context lengths; None: the longest of `lengths` (where the table reads decode latency and TTFT)
    latency_lengths: list[int] | None = None
    latency_rounds: int = 3  # latency cells run this many times, interleaved: the decode interval resamples rounds
    fidelity_windows: int = 8  # windows of the text, run as one batch: more predictions for the same decode steps
    fidelity_prefill: int = 384
    fidelity_steps: int = 32  # per window: 8 x 32 = 256 teacher-forced predictions
    fidelity_text: str | None = None  # a text file; None: the shipped public-domain text
    device: str = "cpu"
    kv_dtype: str = "bfloat16"  # KV as GPUs hold it
    compute_dtype: str | None = None  # None: the KV dtype where the device computes it natively, else float32
    weights: str | None = None  # None: the checkpoint's, in the compute dtype; nf4, fp4, int8: bitsandbytes
    questions: list[str] = field(default_factory=lambda: ["after"])  # question placements (QUESTIONS)
    followups: int = 1  # questions per case, each about another needle (> 1: FOLLOWUP_TASKS, in every mode)
    modes: list[str] = field(default_factory=lambda: list(MODES))  # how follow-ups meet the context (MODES)
    compile: bool = False  # latency cells of strategies with a static step (make_cache's compile=True) run compiled
    prefill_chunk: int | None = None  # score-based retentions prefill this many tokens at a time, evicting between
    sessions: int = 32
    context: int = 32768
    # capacity cells: the KV bytes concurrent sessions share ('96MiB', '0.5GB' or bytes; AUTO_BUDGET: AUTO_SESSIONS
    # sessions of `full` at each latency length by their analytic KV, `budget_at`); at each latency length the most
    # sessions whose measured peak KV fits it decode as one batch; None or 'none': no capacity cells
    kv_budget: int | str | None = AUTO_BUDGET
    capacity_rounds: int = 1  # capacity cells run this many times, interleaved; one round's interval resamples steps
    # output-length cells: this many passages of the fidelity text at the longest length, each followed by a request
    # for a long answer, generated greedily to EOS or `output_cap` tokens; 0: none
    outputs: int = 0
    output_cap: int = 256
    thresholds: Thresholds = field(default_factory=Thresholds)
    cases: int = CASES  # the version of the recall cases' generators (cases.CASES) the records were made with

    def __post_init__(self):
        # a set's name stands for its strategies; bad strategies fail before any work
        named = [s for name in self.strategies for s in STRATEGY_SETS.get(name, [name])]
        self.strategies = list(dict.fromkeys(str(parse_strategy(s)) for s in named))
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:  # checked here, not at the cell that needs it, so a run never stops half-way on a typo
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; allowed: {', '.join(TASKS)}")
        if "full" not in self.strategies:
            self.strategies.insert(0, "full")  # every loss is measured against it
        self.lengths = parse_token_list(self.lengths, "lengths")
        self.context = parse_tokens(self.context, "context")
        if not self.lengths:
            raise ValueError("lengths must list at least one token count")
        if self.latency_lengths is None:
            self.latency_lengths = [max(self.lengths)]
        self.latency_lengths = parse_token_list(self.latency_lengths, "latency_lengths")
        if not self.latency_lengths:
            raise ValueError("latency_lengths must list at least one token count")
        for name, value in (
            ("lengths", min(self.lengths)),
            ("latency_lengths", min(self.latency_lengths)),
            ("depths", self.depths),
            ("seeds", self.seeds),
            ("sessions", self.sessions),
            ("context", self.context),
            ("max_new_tokens", self.max_new_tokens),
            ("recall_batch", self.recall_batch),
            ("decode_steps", self.decode_steps),
            ("latency_rounds", self.latency_rounds),
            ("capacity_rounds", self.capacity_rounds),
            ("fidelity_windows", self.fidelity_windows),
            ("fidelity_prefill", self.fidelity_prefill),
            ("fidelity_steps", self.fidelity_steps),
            ("output_cap", self.output_cap),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        bad = [q for q in self.questions if q not in QUESTIONS]
        if bad or not self.questions:
            raise ValueError(f"questions must list placements among {', '.join(QUESTIONS)}, got {self.questions}")
        if not isinstance(self.followups, int) or isinstance(self.followups, bool) or self.followups < 1:
            raise ValueError(f"followups must be a number of questions per case >= 1, got {self.followups!r}")
        single = [t for t in self.tasks if t not in FOLLOWUP_TASKS]
        if self.followups > 1 and single:
            raise ValueError(
                f"followups needs tasks that plant a needle per question; {', '.join(single)} cannot; allowed: "
                f"{', '.join(FOLLOWUP_TASKS)}"
            )
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"modes must list follow-up modes among {', '.join(MODES)}, got {self.modes}")
        if not isinstance(self.outputs, int) or isinstance(self.outputs, bool) or self.outputs < 0:
            raise ValueError(f"outputs must be a number of prompts >= 0, got {self.outputs!r}")
        word = self.kv_budget.strip().lower() if isinstance(self.kv_budget, str) else None
        if word in ("none", AUTO_BUDGET):
            self.kv_budget = None if word == "none" else AUTO_BUDGET
        if self.kv_budget is not None and self.kv_budget != AUTO_BUDGET:
            budget = (
                self.kv_budget if isinstance(self.kv_budget, int) else parse_memory(str(self.kv_budget), "kv_budget")
            )
            if isinstance(budget, bool) or budget < 1:
                raise ValueError(
                    f"kv_budget must be a positive size such as 96MiB, {AUTO_BUDGET} or none, got {self.kv_budget!r}"
                )
            self.kv_budget = int(budget)
        if self.followups > 1 and not all(self.modes_for(q) for q in self.questions):
            raise ValueError("modes reuse asks follow-ups only with questions after; with questions inside add chat")
        if self.prefill_chunk is not None and self.prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk must be a positive number of tokens, got {self.prefill_chunk}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be true or false, got {self.compile!r}")
        if self.weights is not None and self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHTS)} (or left out), got {self.weights!r}")
        parse_dtype(self.kv_dtype, "kv_dtype")
        parse_dtype(self.compute_dtype, "compute_dtype")
        if self.fidelity_text is not None and not Path(self.fidelity_text).is_file():
            raise ValueError(f"fidelity_text must be a readable text file, got {self.fidelity_text!r}")
        if isinstance(self.thresholds, dict):
            self.thresholds = Thresholds(**self.thresholds)

    def modes_for(self, question: str) -> list[str]:
        """The follow-up modes a question placement runs. `reuse` asks a later question in the first one's place,
        which only a question after the context has: with the question inside the prompt the stored prefix ends in
        the first question's answer turn, and a later question after an empty answer is answered with nothing
        (`full`'s too, measured), so there only `chat` asks follow-ups."""
        return [mode for mode in self.modes if mode == "chat" or question == "after"]

    @classmethod
    def from_dict(cls, data: dict) -> ReportConfig:
        unknown = sorted(set(data) - set(cls.fields()))
        if unknown:
            raise ValueError(
                f"unknown report setting(s) {', '.join(unknown)}; allowed: {', '.join(sorted(cls.fields()))}"
            )
        return cls(**data)

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def budget_at(self, length: int) -> int:
        """The KV budget of the capacity cells at a latency length, in bytes: `kv_budget`, or with AUTO_BUDGET
        AUTO_SESSIONS sessions of `full` holding `length` tokens and the decode steps (analytic KV)."""
        if self.kv_budget is None:
            raise ValueError("this run has no KV budget (kv_budget none): it has no capacity cells")
        if self.kv_budget != AUTO_BUDGET:
            return self.kv_budget
        tokens = length + self.decode_steps
        return AUTO_SESSIONS * expected_kv_bytes(
            load_config(self.model), "full", tokens, dtype=parse_dtype(self.kv_dtype)
        )

    @classmethod
    def default(cls, name: str):
        """A setting's default, for the CLI's flags and help."""
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        return f.default_factory() if f.default is dataclasses.MISSING else f.default


def configs_of(meta: dict) -> list[ReportConfig]:
    """The ReportConfigs a records file was run with: one per model (files from before model grids hold one; files
    from before batched recall ran one case at a time, with the first generators' cases; files from before
    latency_lengths timed latency at every length; before a KV budget by default, none had one unless given, and
    its capacity cells ran every latency round)."""
    return [
        ReportConfig.from_dict(
            {
                "recall_batch": 1,
                "cases": 1,
                "latency_lengths": c.get("lengths"),
                "kv_budget": None,
                "capacity_rounds": c.get("latency_rounds", 3),
                **c,
            }
        )
        for c in meta.get("configs") or [meta["config"]]
    ]


def check_budget(config: ReportConfig) -> None:
    """Refuse, before any work, a KV budget that holds no session of `full` at the shortest latency length (its
    analytic bytes): capacity cells would measure nothing."""
    if config.kv_budget in (None, AUTO_BUDGET):  # an automatic budget holds AUTO_SESSIONS sessions
        return
    length = min(config.latency_lengths)
    one = expected_kv_bytes(load_config(config.model), "full", length, dtype=parse_dtype(config.kv_dtype))
    if config.kv_budget < one:
        raise ValueError(
            f"kv_budget {config.kv_budget / 2**20:.2f} MiB holds no session of full at {length} tokens "
            f"({one / 2**20:.2f} MiB of KV each); give at least that, e.g. {4 * one / 2**20:.0f}MiB for 4 sessions"
        )


# `kvcompress report --smoke`: the whole pipeline in about a minute on 2 CPU cores (CI runs it); numbers mean nothing
SMOKE = dict(
    strategies=["full", "int8", "window:window=64"],
    tasks=["passkey"],
    lengths=[256],
    depths=2,
    seeds=1,
    max_new_tokens=8,
    decode_steps=4,
    latency_rounds=2,
    fidelity_windows=2,
    fidelity_prefill=64,
    fidelity_steps=8,
)
