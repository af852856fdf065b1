"""What a run will cost before it starts: a short timing of the run's model on the run's device (the calibration), the
work each cell declares (tokens prefilled, decode steps of so many rows, the extra passes its retention needs), and
the two combined into estimated seconds per cell, which the progress bar advances by.

The timing model: a prefill of `tokens` tokens of `rows` rows over `context` tokens already cached costs
`rows * (a * tokens + b * ((context + tokens)**2 - context**2))` (the weights' work grows with the tokens, attention's
with the square of the context); a decode step costs `c0 + rows * (c1 + d * context)` (a step's fixed cost, each
row's weights, each row's reading of its cache). `a` and `b` are fitted on prefills at two lengths; `c0`, `c1` and `d`
on decode steps at two contexts and two batch sizes (a decode step reads the whole cache for one query, so its
context costs more per token than a prefill's attention does).
"""

from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass, field

import torch

from ..accounting import KVSizer, kv_sizer
from ..cache import make_cache
from ..dtypes import dtype_name, parse_dtype
from ..models import load_config, load_model
from ..planner import parameter_count
from ..prefill import ATTENTION_ROWS
from ..provenance import device_name
from ..strategy import parse_strategy
from .cells import cell_keys, latency_warmup
from .config import ReportConfig
from .latency import time_generation
from .tasks import depths

# decode steps timed as (rows, context): one row after each one-row prefill (the 256- and the 1k-token, the figure
# printed), eight rows over a short context; the prefills' lengths are the first two contexts
DECODE_POINTS = ((1, 256), (1, 1024), (8, 32))
DECODE_STEPS = 8  # timed steps at each point (their median)
QUESTION_TOKENS = 24  # about what a recall question and its chat turn add after the context
# the passes a retention's needs add over the prompt, each a prefill of the prompt over the prompt already cached:
# a reconstruction (kvzip) feeds the context again after itself
EXTRA_PASSES = {"reconstruction": 1}


@dataclass
class Work:
    """What a piece of a run computes: prefills as (rows, tokens, context already cached) and decode runs as (rows,
    steps, context)."""

    prefill: list[tuple[int, int, int]] = field(default_factory=list)
    decode: list[tuple[int, int, int]] = field(default_factory=list)

    def __add__(self, other: Work) -> Work:
        return Work(self.prefill + other.prefill, self.decode + other.decode)


@dataclass(frozen=True)
class Calibration:
    """Seconds measured on the run's device: one-row prefills by length, decode steps by (rows, context)."""

    prefill_s: dict[int, float]  # {tokens: seconds} of a one-row prefill into an empty cache
    decode_step_s: dict[tuple[int, int], float]  # {(rows, context): seconds} of one decode step (DECODE_POINTS)
    device: str
    compute_dtype: str
    scale: float = 1.0  # another model of a sweep: its cost relative to the model timed, by parameter count

    @property
    def prefill_1k_s(self) -> float:
        return self.prefill_s[max(self.prefill_s)]

    @property
    def prefill_coefficients(self) -> tuple[float, float]:
        """(a, b): seconds per token and per token squared of a one-row prefill, fitted on the two lengths."""
        (short, short_s), (long, long_s) = sorted(self.prefill_s.items())
        b = (long_s / long - short_s / short) / (long - short)
        if b < 0:  # timing noise: no growth with context to fit, a constant per token
            return (short_s + long_s) / (short + long), 0.0
        return short_s / short - b * short, b

    @property
    def decode_coefficients(self) -> tuple[float, float, float]:
        """(c0, c1, d): a decode step's fixed seconds, each row's, and each row's per context token; d from the
        one-row steps at two contexts, c0 and c1 from the one-row and the many-row steps (noise clamped to >= 0)."""
        (one, short), (_, long), (many, brief) = DECODE_POINTS
        step = self.decode_step_s
        d = max(0.0, (step[one, long] - step[one, short]) / (long - short))
        one_s, many_s = step[one, long] - one * long * d, step[many, brief] - many * brief * d
        per_row = max(0.0, (many_s - one_s) / (many - one))
        return max(0.0, one_s - one * per_row), per_row, d

    def prefill_seconds(self, rows: int, tokens: int, context: int = 0) -> float:
        a, b = self.prefill_coefficients
        return self.scale * rows * (a * tokens + b * ((context + tokens) ** 2 - context**2))

    def decode_seconds(self, rows: int, steps: int, context: int) -> float:
        fixed, per_row, per_context = self.decode_coefficients
        return self.scale * steps * (fixed + rows * (per_row + per_context * context))

    def seconds(self, work: Work) -> float:
        return sum(self.prefill_seconds(*p) for p in work.prefill) + sum(self.decode_seconds(*d) for d in work.decode)

    def scaled(self, scale: float) -> Calibration:
        return Calibration(self.prefill_s, self.decode_step_s, self.device, self.compute_dtype, scale)

    def record(self) -> dict:
        """What the records' meta holds: the measured seconds (the 1k prefill first, the figure to scale by)."""
        return {
            "prefill_1k_s": round(self.prefill_1k_s, 4),
            "prefill_s": {str(n): round(s, 4) for n, s in self.prefill_s.items()},
            "decode_step_s": {f"{rows}x{context}": round(s, 5) for (rows, context), s in self.decode_step_s.items()},
            "device": self.device,
            "compute_dtype": self.compute_dtype,
        }

    @classmethod
    def from_record(cls, record: dict) -> Calibration:
        return cls(
            {int(n): s for n, s in record["prefill_s"].items()},
            {tuple(map(int, key.split("x"))): s for key, s in record["decode_step_s"].items()},
            record["device"],
            record["compute_dtype"],
        )

    def line(self) -> str:
        (one, _), (_, long), _ = DECODE_POINTS
        return (
            f"calibration: 1k-token prefill {self.prefill_1k_s:.2f} s on {self.device} ({self.compute_dtype}); "
            f"a decode step {1e3 * self.decode_step_s[one, long]:.0f} ms over {long} tokens"
        )


_MEASURED: dict[tuple, Calibration] = {}


def calibrate(model, device_label: str) -> Calibration:
    """The model's `measure_calibration`, taken once per process for its architecture, dtypes, device and thread
    count (what its timings depend on), so the runs of one process (a test session, a notebook, several reports or
    lm-eval runs) share one timing rather than each spending a 1k-token prefill and its decode steps on it."""
    plan = getattr(model, "dtype_plan", model.dtype)
    key = (model.config.to_json_string(), str(plan), str(model.device), device_label, torch.get_num_threads())
    if key not in _MEASURED:
        _MEASURED[key] = measure_calibration(model, device_label)
    return _MEASURED[key]


@torch.no_grad()
def measure_calibration(model, device_label: str) -> Calibration:
    """Time the model's plain one-row prefills of DECODE_POINTS' two one-row contexts, and decode steps at every
    point, after a warm-up pass."""
    generator = torch.Generator().manual_seed(0)

    def timed(rows: int, tokens: int, steps: int) -> tuple[float, float]:
        ids = torch.randint(0, model.config.vocab_size, (rows, tokens), generator=generator).to(model.device)
        with make_cache(model, "full") as cache:
            timing = time_generation(model, ids, cache, steps)
        return timing["ttft_s"], statistics.median(timing["decode_s"])

    (one, short), (_, long), (many, brief) = DECODE_POINTS
    timed(many, brief, 2)  # warm-up: first calls allocate and pick kernels
    prefill_short, decode_short = timed(one, short, DECODE_STEPS)
    prefill_long, decode_long = timed(one, long, DECODE_STEPS)
    _, decode_many = timed(many, brief, DECODE_STEPS)
    return Calibration(
        {short: prefill_short, long: prefill_long},
        {(one, short): decode_short, (one, long): decode_long, (many, brief): decode_many},
        device_label,
        dtype_name(model.dtype_plan.compute),
    )


def calibrate_model(
    spec: str, device: str, dtype: str | None = None, kv_dtype: str | None = None, weights: str | None = None
) -> dict:
    """Load a model as a run would and time it (`calibrate`): for runs whose workers load their own (lm-eval's)."""
    model, _ = load_model(spec, dtype=dtype, device=device, kv_dtype=kv_dtype, weights=weights)
    return calibrate(model, device_name(device)).record()


def documents_work(strategy: str, documents: list[tuple[int, int]], batch_size: int = 1) -> Work:
    """One strategy's pass over lm-eval documents, each (prompt tokens, generation budget in steps), `batch_size` at
    a time: every batch prefilled (plus its retention's extra passes), then decoded for its longest budget."""
    work = Work()
    for start in range(0, len(documents), batch_size):
        batch = documents[start : start + batch_size]
        rows, prompt, steps = len(batch), max(p for p, _ in batch), max(s for _, s in batch)
        passes = _extra_passes(strategy) * [(rows, prompt, prompt)]
        work += Work([(rows, prompt, 0), *passes], [(rows, steps, prompt)] if steps else [])
    return work


def _extra_passes(strategy: str) -> int:
    return sum(EXTRA_PASSES.get(need, 0) for need in parse_strategy(strategy).retention.needs)


def _prefills_again(strategy: str, config: ReportConfig) -> bool:
    """Whether a shared prefill cannot be replayed into this strategy's cache, so it prefills for real (Prefill.fill):
    a seam member prefilled in chunks, or one reading more queries than a recording holds."""
    retention = parse_strategy(strategy).retention
    return retention.seam and (config.prefill_chunk is not None or retention.attention_rows > ATTENTION_ROWS)


def _recall_batches(config: ReportConfig) -> dict[tuple[float, int], tuple[int, int]]:
    """(depth, seed) -> (its batch's number, rows in that batch): the grid's cases of a task and length, in grid
    order, `recall_batch` at a time (as Harness._batch makes them with the question after the context)."""
    cases = [(d, s) for d in depths(config.depths) for s in range(config.seeds)]
    size = config.recall_batch
    return {case: (i // size, min(size, len(cases) - i // size * size)) for i, case in enumerate(cases)}


def cell_work(jobs: list[tuple[int, dict]], configs: list[ReportConfig]) -> dict[str, Work]:
    """Each job's work by cell id. Work shared by several cells is charged to the first of them left to run, where
    the harness does it: a recall batch's context prefill (every strategy's rows replay it) and each strategy's pass
    over the batch (the batch-mates' cells then cost nothing), the fidelity reference (full's windows)."""
    work: dict[str, Work] = {}
    charged: set[tuple] = set()
    batches = [_recall_batches(c) for c in configs]

    sizers: dict[tuple, KVSizer] = {}

    def sizer(config: ReportConfig, strategy: str) -> KVSizer:
        key = (config.model, strategy, config.kv_dtype)
        if key not in sizers:
            sizers[key] = kv_sizer(load_config(config.model), strategy, parse_dtype(config.kv_dtype))
        return sizers[key]

    def once(key: tuple, shared: Work) -> Work:
        if key in charged:
            return Work()
        charged.add(key)
        return shared

    for index, cell in jobs:
        config, kind, strategy = configs[index], cell["kind"], cell["strategy"]
        mine = Work()
        if config.model.startswith("random:") and kind in ("recall", "fidelity", "output"):
            pass  # a random-weight model skips them (Harness.skipped)
        elif kind == "recall":
            length, question = cell["length"], cell["question"]
            number, rows = batches[index].get((cell["depth"], cell["seed"]), (cell["id"], 1))
            batch = (index, cell["task"], length, question, number)
            context = length - QUESTION_TOKENS
            mine += once(batch, Work(prefill=[(rows, context, 0)]))
            passes = _extra_passes(strategy) * [(rows, context, context)]
            again = [(rows, context, 0)] if _prefills_again(strategy, config) else []
            # every question of a case is answered in the strategy's first cell: the first once, each later one
            # once per mode
            answers = 1 + (config.followups - 1) * len(config.modes_for(question)) if "turn" in cell else 1
            steps = answers * [(rows, config.max_new_tokens, length)]  # an upper bound: rows stop at their answer
            questions = answers * [(rows, QUESTION_TOKENS, context)]
            mine += once((*batch, strategy), Work(again + passes + questions, steps))
        elif kind == "latency":
            length, steps = cell["length"], config.decode_steps + latency_warmup(config.decode_steps)
            passes = _extra_passes(strategy) * [(1, length, length)]
            mine = Work([(1, length, 0), *passes], [(1, steps, length)])
        elif kind == "capacity":  # one session prefilled and probed, then copies of it: as many as the analytic size
            length, steps = cell["length"], config.decode_steps + latency_warmup(config.decode_steps)
            sessions = config.budget_at(length) // sizer(config, strategy).bytes(length + steps)
            passes = _extra_passes(strategy) * [(1, length, length)]
            mine = Work([(1, length, 0), *passes], [(1, 1, length), (sessions, steps, length)])
        elif kind == "output":  # every answer runs to the cap: an upper bound
            rows, length = config.outputs, cell["length"] + QUESTION_TOKENS
            passes = _extra_passes(strategy) * [(rows, length, length)]
            mine = Work([(rows, length, 0), *passes], [(rows, config.output_cap, length)])
        elif kind == "fidelity":
            windows, prefill, steps = config.fidelity_windows, config.fidelity_prefill, config.fidelity_steps - 1
            context = prefill + steps // 2
            mine += once((index, "fidelity"), Work([(windows, prefill, 0)], [(windows, steps, context)]))
            if parse_strategy(strategy) != parse_strategy("full"):
                passes = _extra_passes(strategy) * [(windows, prefill, prefill)]
                again = [(windows, prefill, 0)] if _prefills_again(strategy, config) else []
                mine += Work(again + passes, [(windows, steps, context)])
        else:
            raise ValueError(f"cell kind must be one of recall, latency, capacity, fidelity, output, got {kind!r}")
        work[cell["id"]] = mine
    return work


def model_scales(configs: list[ReportConfig]) -> list[float]:
    """Each config's model cost relative to the first's (the model calibrated), by parameter count."""
    models = {c.model for c in configs}
    if len(models) == 1:
        return [1.0] * len(configs)
    counts = {m: parameter_count(load_config(m)) for m in models}
    return [counts[c.model] / counts[configs[0].model] for c in configs]


def cell_costs(jobs: list[tuple[int, dict]], configs: list[ReportConfig], calibration: Calibration) -> dict[str, float]:
    """Estimated seconds of each job, by cell id."""
    scales = model_scales(configs)
    work = cell_work(jobs, configs)
    return {cell["id"]: calibration.scaled(scales[index]).seconds(work[cell["id"]]) for index, cell in jobs}


def duration(seconds: float) -> str:
    """'1 h 02 min', '3 min 05 s', '42 s'."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def grid_lines(
    configs: list[ReportConfig],
    jobs: list[tuple[int, dict]],
    costs: dict[str, float],
    finished: int = 0,
    workers: int = 1,
) -> list[str]:
    """The run's grid (strategies x cells of each kind, per model) and its estimated duration, for its header;
    `finished`: cells done by an earlier run, not in the estimate."""
    lines = []
    for config in configs:
        kinds = collections.Counter(cell["kind"] for cell in cell_keys(config))
        per_strategy = {kind: count // len(config.strategies) for kind, count in kinds.items()}
        placements = f" x {len(config.questions)} placements" if len(config.questions) > 1 else ""
        parts = [
            f"recall {per_strategy.get('recall', 0)} ({len(config.tasks)} tasks x {len(config.lengths)} lengths x "
            f"{len(depths(config.depths)) * config.seeds} cases{placements})",
            f"latency {per_strategy.get('latency', 0)} ({len(config.latency_lengths)} lengths x "
            f"{config.latency_rounds} rounds)",
            f"fidelity {per_strategy.get('fidelity', 0)}",
        ]
        if config.kv_budget is not None:
            longest = max(config.latency_lengths)
            parts.insert(
                2,
                f"capacity {per_strategy.get('capacity', 0)} (at a {config.budget_at(longest) / 2**20:.1f} MiB KV "
                f"budget at {longest} tokens)",
            )
        model = f" ({config.model})" if len(configs) > 1 else ""
        lines.append(
            f"grid{model}: {len(config.strategies)} strategies x {sum(per_strategy.values())} cells "
            f"({', '.join(parts)}) = {kinds.total()} cells"
        )
    by_kind: dict[str, float] = {}
    for _, cell in jobs:
        by_kind[cell["kind"]] = by_kind.get(cell["kind"], 0.0) + costs[cell["id"]]
    total = sum(by_kind.values())
    kinds = ", ".join(f"{kind} {duration(s)}" for kind, s in by_kind.items())
    parallel = f", about {duration(total / workers)} on {workers} workers" if workers > 1 else ""
    earlier = f" ({finished} finished earlier, not counted)" if finished else ""
    lines.append(f"estimate: {len(jobs)} cells to run{earlier}, {duration(total)} of work ({kinds}){parallel}")
    return lines
