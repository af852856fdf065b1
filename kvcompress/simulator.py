"""A discrete-event simulation of one GPU's KV memory under a mix of routes (sessions arriving, taking turns,
thinking, disconnecting), for each strategy: what a fleet does before it is bought.

Memory per session is the analytic KV size of its resident tokens under the strategy (retention caps them, codecs
shrink them), held through an allocator: `contiguous` reserves the route's longest possible context at admission,
`paged` grows in blocks. Deterministic for a seed.

A host or disk tier is not free: the part of a session's KV kept off the device is held, through the same allocator,
against that tier's capacity (host RAM or disk space), and every decoding session streams it over the tier's link
(PCIe, or the disk) once per generated token. When the decoding sessions together ask the link for more than it
carries, each decodes proportionally slower, so its answer takes longer and its KV stays resident longer.

The `park` idle policy moves a session's device KV to host memory whenever it is not decoding (thinking between
turns, ended, disconnected) and restores it on its next turn, at the save and load throughput a measured run found
(`ParkCosts`, read from `experiments/bench_reuse.py`'s reuse.json): parking frees HBM once the copy is done, and a
restore needs device room again and delays that turn's first token.

By default every session decodes at one constant rate and a prompt costs no time. With `StepCosts` (read from
`experiments/bench_steps.py`'s steps.json) a decode step's seconds depend on how many sessions decode together and
over how much context, and a turn's first token waits for its prompt's prefill, both as measured on the machine the
file names.
"""

from __future__ import annotations

import bisect
import heapq
import json
import math
import random
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml

from .accounting import kv_sizer
from .provenance import provenance
from .strategy import StrategySpec, parse_strategy
from .tiers import DEVICE_MEMORY, TIERS

# A route whose answers decode, on average, over 10% slower than decode_tps is reported bandwidth-bound: below that
# the link is busy but not what users notice.
BANDWIDTH_BOUND = 0.9
# Where the park policy keeps a parked session's KV: host RAM, sized by SimConfig.host_bytes (shared with an offload
# tier that the same setting sizes).
PARK_MEMORY, PARK_CAPACITY_SETTING = "host", "host_bytes"
# The reuse.json fields ParkCosts reads from each row at the largest length.
PARK_COST_FIELDS = ("save_mb_per_s", "load_mb_per_s", "load_s", "restore_s")
MB = 1e6  # reuse.json's MB/s are decimal megabytes
STEPS_FILE = "steps.json"  # what experiments/bench_steps.py writes: the step costs StepCosts reads
RECORD_FILE = "simulate.json"  # what a run writes into its folder: the records, and the plot of KV memory over time
PLOT_FILE = "kv_memory.png"

ROUTE_FIELDS = {
    "name": str,
    "rate_per_min": float,
    "prompt_tokens": list,
    "output_tokens": list,
    "turns": list,
    "think_s": list,
    "disconnect_p": float,
}


@dataclass(frozen=True)
class Route:
    name: str
    rate_per_min: float
    prompt_tokens: tuple[int, int]  # uniform [low, high] per turn; a single number means fixed
    output_tokens: tuple[int, int]
    turns: tuple[int, int]
    think_s: tuple[float, float]
    disconnect_p: float  # chance, per turn, that the client goes away mid-answer
    arrivals_s: tuple[float, ...] = ()  # explicit arrival times (a trace) instead of a Poisson rate

    @property
    def max_tokens(self) -> int:
        return self.turns[1] * (self.prompt_tokens[1] + self.output_tokens[1])


class _LineLoader(yaml.SafeLoader):
    pass


def _mapping_with_line(loader, node, deep=False):
    mapping = yaml.SafeLoader.construct_mapping(loader, node, deep=deep)
    mapping["__line__"] = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_with_line)


def load_routes(path: str | Path) -> list[Route]:
    """Routes from YAML (`routes:` list). A missing field or a bad value names the field and the line."""
    data = yaml.load(Path(path).read_text(), Loader=_LineLoader) or {}
    if not isinstance(data.get("routes"), list) or not data["routes"]:
        raise ValueError(f"{path}: needs a non-empty 'routes:' list")
    routes = []
    for entry in data["routes"]:
        line = entry.pop("__line__", "?")
        where = f"{path} line {line}"
        required = set(ROUTE_FIELDS) - ({"rate_per_min"} if "arrivals_s" in entry else set())
        missing = sorted(required - set(entry))
        if missing:
            raise ValueError(f"{where}: route is missing field(s) {', '.join(missing)}")
        unknown = sorted(set(entry) - set(ROUTE_FIELDS) - {"arrivals_s"})
        if unknown:
            raise ValueError(
                f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(ROUTE_FIELDS)}, arrivals_s"
            )

        def span(name, kind=int, entry=entry, where=where):
            value = entry[name]
            low, high = (value, value) if not isinstance(value, list) else (value[0], value[-1])
            if low < 0 or high < low:
                raise ValueError(f"{where}: {name} must be a non-negative number or [low, high], got {value!r}")
            return kind(low), kind(high)

        rate = float(entry.get("rate_per_min", 0.0))
        if rate < 0:
            raise ValueError(f"{where}: rate_per_min must be >= 0, got {rate}")
        if not 0 <= float(entry["disconnect_p"]) <= 1:
            raise ValueError(f"{where}: disconnect_p must be within [0, 1], got {entry['disconnect_p']}")
        turns = span("turns")
        if turns[0] < 1:
            raise ValueError(f"{where}: turns must be >= 1, got {entry['turns']!r}")
        routes.append(
            Route(
                str(entry["name"]),
                rate,
                span("prompt_tokens"),
                span("output_tokens"),
                turns,
                span("think_s", float),
                float(entry["disconnect_p"]),
                tuple(float(t) for t in entry.get("arrivals_s", ())),
            )
        )
    return routes


def _p95(values: list[float]) -> float:
    """The 95th percentile of `values` (a single value is its own; none is 0)."""
    if len(values) > 1:
        return statistics.quantiles(values, n=20)[-1]
    return values[0] if values else 0.0


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def route_outcome(
    failures: dict[str, int],
    leaked: float,
    queued: bool,
    evictions: int,
    tier=None,
    tier_evictions: dict[str, int] | None = None,
    speed: float = 1.0,
    demand: float = 0.0,
) -> str:
    """A route's outcome, the pressure that hurts most first. failures: allocation failures by the memory that ran
    short; leaked: the share of its KV held for disconnected clients; queued: whether a session waited for room;
    evictions: idle sessions evicted before their TTL. With an offload `tier`: those evictions by memory, and the
    decode speed its link allowed (a fraction of the unhindered one) and the link demand behind it."""
    memory = tier.memory if tier is not None else None
    # the tier running out comes first: room for more sessions is what the offload was chosen for
    if tier is not None and failures.get(memory):
        device = failures.get(DEVICE_MEMORY)
        also = f"; {device} more short of device memory" if device else ""
        return f"{tier.shortage} ({failures[memory]} allocation failures{also})"
    if failures:
        return f"allocation failures ({failures[DEVICE_MEMORY]})"
    if speed < BANDWIDTH_BOUND:
        return f"bandwidth-bound (decode {speed:.2g}x, {tier.link} {demand:.0%} demanded)"
    if leaked > 0.3:
        return f"leaked state ({leaked:.0%} of its KV held for disconnected clients)"
    if queued:
        return "queueing"
    if tier is not None and (tier_evictions or {}).get(memory):
        return f"{tier.shortage} ({tier_evictions[memory]} idle sessions evicted before their TTL)"
    if evictions:
        return f"memory-bound ({evictions} idle sessions evicted before their TTL)"
    return "healthy"


@dataclass(frozen=True)
class ParkCosts:
    """What parking a session's KV off the GPU and restoring it cost, from a measured run.

    `read` takes the rows of reuse.json (`python experiments/bench_reuse.py`) at the largest prompt length measured,
    one per strategy, and combines them by the median of each figure over those rows: the throughputs are bytes
    moved per second whatever the strategy, and the median keeps one strategy's slow rounds from setting the fleet's
    figure. The restore overhead is restore-to-first-token minus the load (the first decode step after a load).
    Parking a session takes its bytes / save throughput, restoring it its bytes / load throughput plus the overhead.
    The benchmark saves to a file on the machine it ran on: measure there what the fleet will park to.
    """

    save_bytes_per_s: float
    load_bytes_per_s: float
    restore_overhead_s: float
    length: int = 0  # the prompt length the rows used were measured at
    source: str = ""  # the file read

    def __post_init__(self):
        for name in ("save_bytes_per_s", "load_bytes_per_s"):
            if not _positive(getattr(self, name)):
                raise ValueError(f"ParkCosts.{name} must be a positive, finite number, got {getattr(self, name)!r}")
        if not (_positive(self.restore_overhead_s) or self.restore_overhead_s == 0):
            raise ValueError(f"ParkCosts.restore_overhead_s must be >= 0 and finite, got {self.restore_overhead_s!r}")

    def park_s(self, nbytes: int) -> float:
        return nbytes / self.save_bytes_per_s

    def restore_s(self, nbytes: int) -> float:
        return nbytes / self.load_bytes_per_s + self.restore_overhead_s

    def record(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def read(cls, path: str | Path) -> ParkCosts:
        """The costs in a reuse.json; a missing file, or a field missing or out of range, raises naming both."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such file (python experiments/bench_reuse.py writes one)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a JSON file ({err})") from None
        rows = data.get("rows") if isinstance(data, dict) else None
        if not isinstance(rows, list) or not rows or not all(isinstance(row, dict) for row in rows):
            raise ValueError(f"{path}: needs a non-empty 'rows' list of objects, as bench_reuse.py writes")
        for i, row in enumerate(rows):
            if not (isinstance(row.get("length"), int) and _positive(row["length"])):
                raise ValueError(f"{path}: rows[{i}].length must be a positive integer, got {row.get('length')!r}")
        length = max(row["length"] for row in rows)
        used = [(i, row) for i, row in enumerate(rows) if row["length"] == length]
        for i, row in used:
            for name in PARK_COST_FIELDS:
                if not _positive(row.get(name)):
                    raise ValueError(f"{path}: rows[{i}].{name} must be a positive number, got {row.get(name)!r}")
            if row["restore_s"] < row["load_s"]:
                raise ValueError(
                    f"{path}: rows[{i}].restore_s ({row['restore_s']}) is below its load_s ({row['load_s']})"
                )

        def median(figure):
            return statistics.median(figure(row) for _, row in used)

        return cls(
            median(lambda row: row["save_mb_per_s"]) * MB,
            median(lambda row: row["load_mb_per_s"]) * MB,
            median(lambda row: row["restore_s"] - row["load_s"]),
            length,
            str(path),
        )


def _linear(points: dict[int, float], x: float) -> tuple[float, bool]:
    """The piecewise-linear value through `points` at `x`, and whether `x` lies outside them. Below the first point
    the first value holds (a step over fewer tokens, or fewer rows, is taken to cost no less than the smallest
    measured); above the last, the last segment's rise goes on (a fall between the last two points, timing noise,
    is not extended: the last value holds)."""
    if x in points:
        return points[x], False
    xs = sorted(points)
    if x < xs[0] or len(xs) == 1:
        return points[xs[0]], True
    i = bisect.bisect_left(xs, x)
    if i == len(xs):
        low, high = xs[-2], xs[-1]
        rise = max(0.0, (points[high] - points[low]) / (high - low))
        return points[high] + rise * (x - high), True
    low, high = xs[i - 1], xs[i]
    return points[low] + (points[high] - points[low]) * (x - low) / (high - low), False


@dataclass(frozen=True)
class StepCosts:
    """What a decode step and a prefill cost, per strategy, as measured on one machine (steps.json, written by
    `python experiments/bench_steps.py`).

    A decode step's seconds are measured on a grid of batch sizes x contexts (every row of the batch over the same
    context) and read linearly in context, then linearly in batch, between grid points; a one-row prefill's seconds
    by prompt length, linearly between lengths. Outside the grid `_linear`'s rule extends it, and each lookup says
    whether it did, so a record can count what it extrapolated.
    """

    decode: dict[str, dict[tuple[int, int], float]]  # strategy -> (batch, context) -> seconds per decode step
    prefill: dict[str, dict[int, float]]  # strategy -> prompt tokens -> seconds to the first token
    source: str = ""  # the file read
    model: str = ""  # the model and machine it was measured with, and that machine's calibration
    device: str = ""
    calibration_prefill_1k_s: float | None = None

    def _table(self, table: dict, strategy: str | StrategySpec) -> dict:
        name = str(parse_strategy(strategy))
        if name not in table:
            raise ValueError(
                f"{self.source}: no step costs for strategy {name!r}; it has {', '.join(table)} "
                f"(python experiments/bench_steps.py --strategies {name} measures it)"
            )
        return table[name]

    def check(self, strategy: str | StrategySpec) -> None:
        """Raise, naming the file, unless it holds `strategy`'s decode steps and prefills."""
        self._table(self.decode, strategy)
        self._table(self.prefill, strategy)

    def decode_step_s(self, strategy: str | StrategySpec, batch: int, context: float) -> tuple[float, bool]:
        """Seconds of one decode step of `batch` sessions over `context` tokens each, and whether it lies outside
        the measured grid."""
        grid = self._table(self.decode, strategy)
        batches, contexts = sorted({b for b, _ in grid}), sorted({c for _, c in grid})
        by_batch, outside = {}, False
        for b in batches:
            by_batch[b], off = _linear({c: grid[b, c] for c in contexts}, context)
            outside |= off
        seconds, off = _linear(by_batch, batch)
        return seconds, outside or off

    def prefill_s(self, strategy: str | StrategySpec, tokens: int) -> tuple[float, bool]:
        """Seconds to prefill a `tokens`-token prompt of one session, and whether it lies outside the lengths
        measured."""
        return _linear(self._table(self.prefill, strategy), tokens)

    def grid(self, strategy: str | StrategySpec) -> dict[str, list[int]]:
        """The batches, contexts and prompt lengths measured for `strategy`."""
        decode = self._table(self.decode, strategy)
        return {
            "batches": sorted({b for b, _ in decode}),
            "contexts": sorted({c for _, c in decode}),
            "prompts": sorted(self._table(self.prefill, strategy)),
        }

    def record(self) -> dict:
        """What a simulation's meta keeps: the file, and the model and machine it measured."""
        names = ("source", "model", "device", "calibration_prefill_1k_s")
        return {name: getattr(self, name) for name in names} | {"strategies": list(self.decode)}

    @classmethod
    def read(cls, path: str | Path) -> StepCosts:
        """The costs in a steps.json. A missing file, a row with a field missing or out of range, or a strategy's
        grid with a hole raises one ValueError naming the file."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such file (python experiments/bench_steps.py writes one)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a JSON file ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: needs 'decode' and 'prefill' lists of objects, as bench_steps.py writes")
        tables: dict[str, dict[str, dict]] = {}
        for part, axes, figure in (("decode", ("batch", "context"), "step_s"), ("prefill", ("tokens",), "prefill_s")):
            rows = data.get(part)
            if not isinstance(rows, list) or not rows or not all(isinstance(row, dict) for row in rows):
                raise ValueError(f"{path}: needs a non-empty '{part}' list of objects, as bench_steps.py writes")
            table: dict[str, dict] = {}
            for i, row in enumerate(rows):
                where = f"{path}: {part}[{i}]"
                try:
                    name = str(parse_strategy(row.get("strategy")))
                except ValueError as err:
                    raise ValueError(f"{where}.strategy: {err}") from None
                for axis in axes:
                    if not (isinstance(row.get(axis), int) and _positive(row[axis])):
                        raise ValueError(f"{where}.{axis} must be a positive integer, got {row.get(axis)!r}")
                if not _positive(row.get(figure)):
                    raise ValueError(f"{where}.{figure} must be a positive number, got {row.get(figure)!r}")
                point = tuple(row[axis] for axis in axes) if len(axes) > 1 else row[axes[0]]
                if point in table.setdefault(name, {}):
                    raise ValueError(f"{where} measures {name!r} at {point} a second time")
                table[name][point] = float(row[figure])
            tables[part] = table
        decode, prefill = tables["decode"], tables["prefill"]
        for name in decode.keys() ^ prefill.keys():
            has, lacks = ("decode steps", "prefill") if name in decode else ("prefills", "decode")
            raise ValueError(f"{path}: strategy {name!r} has {has} but no {lacks} rows")
        for name, grid in decode.items():
            batches, contexts = sorted({b for b, _ in grid}), sorted({c for _, c in grid})
            for b in batches:
                for c in contexts:
                    if (b, c) not in grid:
                        raise ValueError(
                            f"{path}: strategy {name!r} has no decode step at batch {b}, context {c}: "
                            "its grid must hold every batch at every context"
                        )
        meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
        calibration = meta.get("calibration") if isinstance(meta.get("calibration"), dict) else {}
        return cls(
            decode,
            prefill,
            str(path),
            str(meta.get("model", "")),
            str(meta.get("device", "")),
            calibration.get("prefill_1k_s"),
        )


@dataclass
class SimConfig:
    gpu_bytes: float
    minutes: float = 60.0
    seed: int = 0
    allocator: str = "paged"  # or "contiguous"
    block_tokens: int = 16
    admission: str = "reject"  # or "queue"
    # or "release": free a session's KV as soon as it ends or disconnects; or "park": move it to host memory whenever
    # it is not decoding (held there for ttl_s once it ends), restoring it on its next turn
    idle_policy: str = "ttl"
    ttl_s: float = 120.0
    decode_tps: float = 40.0  # tokens/s one session generates
    sample_s: float = 10.0
    # The host and disk tiers, per GPU (fields after the positional ones the CLI passes, so its call is unchanged).
    # Host RAM for offloaded KV: a DGX H100/H200 has 2 TiB of host memory for its 8 GPUs, 256 GiB each; the OS, the
    # weights' host copy and pinned staging take some of that, so a real fleet should pass what is really free.
    host_bytes: float = 256 * 2**30
    # Host-to-device link: 55e9 B/s is the pinned H2D bandwidth measured on an H200 over PCIe Gen5 x16 (55.3 GB/s,
    # results/gpu/offload.md); a decode step of an offloaded session reads its off-device KV back over it.
    pcie_bytes_per_s: float = 55e9
    # Disk space for the disk tier: one 2 TiB data-centre NVMe drive per GPU (a DGX H100 has 8 x 3.84 TB, so this
    # is on the safe side).
    disk_bytes: float = 2 * 2**40
    # Disk read bandwidth: 3e9 B/s, what one NVMe drive sustains reading through a file system (Gen4 drives quote
    # ~7 GB/s sequential at best; the page cache is no help for KV read once per step and larger than RAM).
    disk_bytes_per_s: float = 3e9
    # The park policy's costs (ParkCosts.read of a measured reuse.json), and the prefill throughput of the simulated
    # model on the simulated GPU (tokens/s), which prices the re-prefill a released session pays instead; both are
    # required by park and read by nothing else.
    park_costs: ParkCosts | None = None
    prefill_tps: float | None = None
    # Measured step costs (StepCosts.read of a steps.json): when given, a decode step's seconds depend on the batch
    # decoding together and its context and a turn's first token waits for its prompt's prefill; decode_tps and
    # prefill_tps are then not read (park prices its re-prefill from the same file).
    step_costs: StepCosts | None = None

    def __post_init__(self):
        choices = {
            "allocator": ("paged", "contiguous"),
            "admission": ("reject", "queue"),
            "idle_policy": ("ttl", "release", "park"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.block_tokens <= 0 or self.minutes <= 0 or self.gpu_bytes <= 0:
            raise ValueError("block_tokens, minutes and gpu memory must be positive")
        # the settings tiers name for their memory's room and their link's speed, in the order declared here
        tiers = [TIERS.get(name) for name in TIERS.names()]
        sized = {tier.capacity_setting for tier in tiers} | {tier.link_setting for tier in tiers}
        for name in (f.name for f in fields(self) if f.name in sized):
            value = getattr(self, name)
            # finite too: an unlimited tier is what made offloading look free; pass a large number to mean "plenty"
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive, finite number, got {value!r}")
        if self.idle_policy == "park":
            if not isinstance(self.park_costs, ParkCosts):
                raise ValueError(
                    f"idle_policy park needs park_costs (ParkCosts.read of a reuse.json), got {self.park_costs!r}"
                )
            if self.step_costs is None and not _positive(self.prefill_tps):
                raise ValueError(
                    f"idle_policy park needs prefill_tps, a positive number (or step_costs), got {self.prefill_tps!r}"
                )
            if self.step_costs is not None and self.prefill_tps is not None:
                raise ValueError("prefill_tps is not read with step_costs, which price the re-prefill park avoids")
        elif self.park_costs is not None or self.prefill_tps is not None:
            raise ValueError(f"park_costs and prefill_tps are read only by idle_policy park, not {self.idle_policy}")
        if self.step_costs is not None and not isinstance(self.step_costs, StepCosts):
            raise ValueError(f"step_costs must be StepCosts (StepCosts.read of a steps.json), got {self.step_costs!r}")


@dataclass(frozen=True)
class Turn:
    """One turn of a planned session: its prompt and answer lengths, then either the share of the answer after
    which its client goes away (`disconnect`, in [0, 1)) or, before a next turn, the think time."""

    prompt: int
    output: int
    disconnect: float | None = None
    think_s: float | None = None


@dataclass(frozen=True)
class PlannedSession:
    """A session of the trace: when it arrives, on which route, and every turn it would take."""

    number: int
    route: Route
    arrival_s: float
    turns: tuple[Turn, ...]


def plan_sessions(routes: list[Route], minutes: float, seed: int) -> list[PlannedSession]:
    """The trace a seed draws from the routes over `minutes`: arrivals (Poisson at each route's rate, or its
    explicit arrivals_s), and per session its turns, drawn from the session's own generator so a session's workload
    is the same whatever else happens. The simulator and the measured replay (`kvcompress replay`) both read it."""
    rng, end, arrivals = random.Random(seed), minutes * 60, []
    for route in routes:
        times = list(route.arrivals_s)
        if not times and route.rate_per_min > 0:
            t = rng.expovariate(route.rate_per_min / 60)
            while t < end:
                times.append(t)
                t += rng.expovariate(route.rate_per_min / 60)
        arrivals += [(t, route) for t in times]
    planned = []
    for number, (t, route) in enumerate(sorted(arrivals, key=lambda x: x[0])):
        session_rng = random.Random(f"{seed}-{number}")
        turns = []
        for left in range(session_rng.randint(*route.turns) - 1, -1, -1):
            prompt, output = session_rng.randint(*route.prompt_tokens), session_rng.randint(*route.output_tokens)
            if session_rng.random() < route.disconnect_p:
                turns.append(Turn(prompt, output, disconnect=session_rng.random()))
                break
            think = session_rng.uniform(*route.think_s) if left else None
            turns.append(Turn(prompt, output, think_s=think))
        planned.append(PlannedSession(number, route, t, tuple(turns)))
    return planned


@dataclass
class _Session:
    id: int
    route: Route
    plan: tuple[Turn, ...]
    tokens: int = 0  # tokens of context seen so far
    bytes: int = 0  # KV bytes held for it
    off_bytes: int = 0  # KV bytes held for it on the host or disk tier
    streamed: int = 0  # off-device KV bytes one decode step reads back (its context's, not its allocation's)
    state: str = "new"  # new, queued, active, idle, gone; active spans a whole conversation, thinking included
    decoding: bool = False  # generating an answer right now (offloading strategies track it: only then it streams)
    speed: float = 1.0  # its current answer's decode speed, as a fraction of decode_tps (the link may slow it)
    queued_at: float | None = None
    pending: tuple[int, int] = (0, 0)  # (prompt, output) of a queued first turn
    disconnected: bool = False
    parked: int = 0  # KV bytes held for it in host memory by the park policy
    # "", "parking" (copying to the host, holding both), "parked" (host bytes only), "restoring" (both again)
    park: str = ""
    park_done_at: float = 0.0  # when its current parking copy finishes
    # with step costs: when its current turn's prompt came, the context its answer decodes over (mid-answer), and
    # its answer's tokens/s before the link's slowdown
    turn_at: float = 0.0
    answer_context: float = 0.0
    tps: float = 0.0
    turn: int = 0  # the plan's turn it is on

    @property
    def turns_left(self) -> int:
        return len(self.plan) - self.turn


@dataclass
class SimResult:
    strategy: str
    samples: list[tuple[float, int]] = field(default_factory=list)  # (time s, KV bytes held)
    per_route: dict = field(default_factory=dict)
    allocation_failures: int = 0
    evictions: int = 0
    queue_waits_s: list[float] = field(default_factory=list)
    fragmentation_pct: float = 0.0
    peak_bytes: int = 0
    final_bytes: int = 0
    # The host/disk tier (all zero, speed 1, for a device strategy). Kept apart from `samples`, which plots unpack.
    failures_by_memory: dict[str, int] = field(default_factory=dict)  # device, host or disk: allocation failures
    offload_samples: list[tuple[float, int]] = field(default_factory=list)  # (time s, bytes held on host or disk)
    peak_off_device_bytes: dict[str, int] = field(default_factory=dict)  # the tier's memory (host, disk): its peak
    final_offload_bytes: int = 0
    # demanded / carried by the tier's link: > 1 means decode is bandwidth-bound; mean over the whole run
    link_utilisation: dict[str, float] = field(default_factory=lambda: {"peak": 0.0, "mean": 0.0})
    # decode speed as a fraction of decode_tps: mean over decoding session-time, and the slowest answer's
    decode_speed: dict[str, float] = field(default_factory=lambda: {"mean": 1.0, "min": 1.0})
    # The park policy's figures (empty for ttl and release, whose records leave them out): host bytes parked,
    # restores and the first-token time they add beside the re-prefill they avoid; and (time s, host bytes parked).
    park: dict = field(default_factory=dict)
    parked_samples: list[tuple[float, int]] = field(default_factory=list)
    # With measured step costs (empty otherwise, and left out of the record): tokens/s per session, the batch it
    # decoded in, first-token times, and how many lookups fell outside the measured grid.
    step_costs: dict = field(default_factory=dict)

    def queue_wait_s(self) -> tuple[float, float]:
        """(p50, p95) of the queue waits (0 where nothing waited)."""
        waits = self.queue_waits_s or [0.0]
        return statistics.median(waits), _p95(waits)

    def record(self) -> dict:
        """What simulate.json keeps of a run."""
        p50, p95 = self.queue_wait_s()
        fields = ("peak_bytes", "allocation_failures", "evictions", "fragmentation_pct")
        return {
            "strategy": self.strategy,
            **{name: getattr(self, name) for name in fields},
            "queue_wait_p50_s": p50,
            "queue_wait_p95_s": p95,
            "routes": self.per_route,
            **{
                name: getattr(self, name)
                for name in ("failures_by_memory", "peak_off_device_bytes", "link_utilisation", "decode_speed")
            },
            "samples": self.samples,
            "offload_samples": self.offload_samples,
            **({"park": self.park, "parked_samples": self.parked_samples} if self.park else {}),
            **({"step_costs": self.step_costs} if self.step_costs else {}),
        }


class Simulation:
    def __init__(
        self,
        model_config,
        strategy: str | StrategySpec,
        routes: list[Route],
        config: SimConfig,
        kv_dtype: torch.dtype | None = None,
    ):
        """kv_dtype: what the KV is stored in (default: the config's dtype), as a model loaded on a CPU stores it."""
        self.spec, self.routes, self.config = parse_strategy(strategy), routes, config
        self.sizer = kv_sizer(model_config, self.spec, kv_dtype)
        # where the off-device KV lives, how much of it fits and how fast a decode step reads it back
        # the tier declares where it keeps tokens (its memory), its link, and the machine settings sizing both
        self.tier = self.spec.tier
        self.offloads = self.tier.memory != DEVICE_MEMORY
        self.off_capacity, self.link_bytes_per_s = (
            (getattr(config, self.tier.capacity_setting), getattr(config, self.tier.link_setting))
            if self.offloads
            else (math.inf, math.inf)
        )
        # the park policy: its costs, and whether its host memory is the offload tier's too
        self.parks, self.costs = config.idle_policy == "park", config.park_costs
        self.park_shares_tier = self.offloads and self.tier.capacity_setting == PARK_CAPACITY_SETTING
        self.parked_held = 0  # bytes parked in host memory
        self._restores: dict[str, list[tuple[float, float]]] = defaultdict(list)  # route -> (restore s, re-prefill s)
        self._restore_failures: dict[str, int] = defaultdict(int)
        self._park_refusals: dict[str, int] = defaultdict(int)  # parks refused for want of host memory
        # measured step costs: checked for this strategy before anything runs
        self.steps = config.step_costs
        if self.steps is not None:
            self.steps.check(self.spec)
        self._answers: dict[str, list[tuple[float, int]]] = defaultdict(list)  # route -> (tokens/s, batch) per answer
        self._ttfts: dict[str, list[float]] = defaultdict(list)  # route -> seconds to each turn's first token
        self._lookups = {"decode": 0, "prefill": 0}  # step-cost lookups, and those outside the measured grid
        self._outside = {"decode": 0, "prefill": 0}
        self._largest = {"batch": 0, "context": 0, "prompt": 0}  # the largest looked up
        self.live: dict[int, _Session] = {}  # sessions holding KV (active or idle)
        self._failures: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))  # route -> memory -> n
        self._evictions: dict[str, int] = defaultdict(int)
        self._evicted_for: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))  # route -> memory -> n
        self.short_of = ""  # the memory (device, host, disk) the last refused allocation lacked
        self.events: list = []
        self.held = 0
        self.off_held = 0  # bytes held on the host or disk tier
        self.queue: list[_Session] = []
        self.result = SimResult(str(self.spec))
        self._seq = 0
        self.now = 0.0
        self._route_time = defaultdict(lambda: defaultdict(float))  # route -> metric -> time integral
        self._last_t = 0.0
        self._used_integral = self._held_integral = 0.0
        self._demand_integral = 0.0  # time integral of link demand / link capacity
        self._decode_integral = self._speed_integral = 0.0  # decoding session-time, and the same weighted by speed
        self._parked_integral = 0.0
        self._peak_parked = 0

    # -- memory --------------------------------------------------------------------------------------------
    def kv_bytes(self, tokens: int) -> int:
        return self.sizer.device_bytes(tokens)

    def off_kv_bytes(self, tokens: int) -> int:
        """The part of the KV of `tokens` kept on the host or disk tier (0 on the device tier)."""
        return self.sizer.bytes(tokens) - self.sizer.device_bytes(tokens)

    def allocation(self, session: _Session, tokens: int, size: Callable[[int], int] | None = None) -> int:
        """Bytes the allocator holds for a session whose context is `tokens` long (on the device, or per `size`)."""
        size = size or self.kv_bytes
        if self.config.allocator == "contiguous":
            return size(session.route.max_tokens)
        blocks = math.ceil(self.sizer.stored(tokens) / self.config.block_tokens)
        return size(blocks * self.config.block_tokens) if blocks else 0

    def _short(self, need: int, off_need: int, park_need: int = 0) -> str:
        """The memory that cannot take `need` more device bytes, `off_need` more tier bytes and `park_need` more
        parked bytes, or ''."""
        if self.held + need > self.config.gpu_bytes:
            return DEVICE_MEMORY
        if self.off_held + off_need + (self.parked_held if self.park_shares_tier else 0) > self.off_capacity:
            return self.tier.memory
        host = self.parked_held + (self.off_held if self.park_shares_tier else 0)
        if park_need and host + park_need > self.config.host_bytes:
            return PARK_MEMORY
        return ""

    def _holds(self, session: _Session, memory: str) -> int:
        """Bytes `session` holds in `memory` (device, the tier's, or the park's)."""
        if memory == DEVICE_MEMORY:
            return session.bytes
        return (session.off_bytes if memory == self.tier.memory else 0) + (
            session.parked if memory == PARK_MEMORY else 0
        )

    def _resize(self, session: _Session, tokens: int) -> bool:
        need = self.allocation(session, tokens) - session.bytes
        off_need = self.allocation(session, tokens, self.off_kv_bytes) - session.off_bytes if self.offloads else 0
        if self._short(need, off_need):
            self._evict_idle(need, off_need)
        self.short_of = self._short(need, off_need)
        if self.short_of:
            return False
        self.held += need
        self.off_held += off_need
        session.bytes += need
        session.off_bytes += off_need
        session.tokens = tokens
        session.streamed = self.off_kv_bytes(tokens) if self.offloads else 0
        self.result.peak_bytes = max(self.result.peak_bytes, self.held)
        if self.offloads:
            peaks = self.result.peak_off_device_bytes
            peaks[self.tier.memory] = max(peaks.get(self.tier.memory, 0), self.off_held)
        return True

    def _free(self, session: _Session) -> None:
        self.held -= session.bytes
        self.off_held -= session.off_bytes
        self.parked_held -= session.parked
        session.bytes, session.off_bytes, session.state, session.decoding = 0, 0, "gone", False
        session.parked, session.park = 0, ""
        self.live.pop(session.id, None)

    def _evict_idle(self, need: int, off_need: int, park_need: int = 0) -> None:
        """Under pressure, idle sessions (held for their TTL) go first, oldest first; only those holding some of the
        memory that is short (a short session of a `cold` offload holds nothing off the device, a parked one
        nothing on it)."""
        for session in sorted((s for s in self.live.values() if s.state == "idle"), key=lambda s: s.id):
            short = self._short(need, off_need, park_need)
            if not short:
                return
            if not self._holds(session, short):
                continue
            self.result.evictions += 1
            self._evictions[session.route.name] += 1
            self._evicted_for[session.route.name][short] += 1
            self._free(session)

    # -- the tier's link -----------------------------------------------------------------------------------
    def _demand(self, extra: int = 0, extra_tps: float = 0.0) -> float:
        """Link bandwidth the decoding sessions (plus `extra` streamed bytes at `extra_tps` tokens/s) ask for, over
        what it carries: each reads its off-device KV once per token, at decode_tps tokens/s (with step costs, at
        its answer's own rate)."""
        if not self.offloads:
            return 0.0
        if self.steps is not None:
            asked = sum(s.streamed * s.tps for s in self.live.values() if s.decoding) + extra * extra_tps
            return asked / self.link_bytes_per_s
        streamed = sum(s.streamed for s in self.live.values() if s.decoding) + extra
        return streamed * self.config.decode_tps / self.link_bytes_per_s

    # -- measured step costs -------------------------------------------------------------------------------
    def _prefill_s(self, tokens: int) -> float:
        seconds, outside = self.steps.prefill_s(self.spec, tokens)
        self._lookups["prefill"] += 1
        self._outside["prefill"] += outside
        self._largest["prompt"] = max(self._largest["prompt"], tokens)
        return seconds

    def _reprefill_s(self, context: int) -> float:
        """What prefilling a released session's whole context again would take."""
        return self._prefill_s(context) if self.steps is not None else context / self.config.prefill_tps

    def _step_s(self, session: _Session) -> tuple[float, int]:
        """Seconds of the decode steps `session` joins (the sessions decoding now and it, over their mean context),
        and that batch's size."""
        contexts = [s.answer_context for s in self.live.values() if s.decoding and s is not session]
        contexts.append(session.answer_context)
        context = statistics.fmean(contexts)
        seconds, outside = self.steps.decode_step_s(self.spec, len(contexts), context)
        self._lookups["decode"] += 1
        self._outside["decode"] += outside
        largest = self._largest
        largest["batch"], largest["context"] = max(largest["batch"], len(contexts)), max(largest["context"], context)
        return seconds, len(contexts)

    # -- events --------------------------------------------------------------------------------------------
    def _push(self, t: float, kind: str, session: _Session) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, self._seq, kind, session))

    def run(self) -> SimResult:
        for planned in plan_sessions(self.routes, self.config.minutes, self.config.seed):
            self._push(planned.arrival_s, "arrive", _Session(planned.number, planned.route, planned.turns))
        t_sample = 0.0
        while self.events:
            t, _, kind, session = heapq.heappop(self.events)
            while t_sample <= t:
                self._sample(t_sample)
                t_sample += self.config.sample_s
            self._integrate(t)
            self.now = t
            getattr(self, f"_on_{kind}")(session)
            self._admit_queued()
        self._sample(t_sample)
        self.result.final_bytes = self.held
        self.result.final_offload_bytes = self.off_held
        by_memory: dict[str, int] = defaultdict(int)
        for failures in self._failures.values():
            for memory, n in failures.items():
                by_memory[memory] += n
        self.result.failures_by_memory = dict(by_memory)
        self.result.allocation_failures = sum(by_memory.values())
        self.result.fragmentation_pct = (
            100 * (1 - self._used_integral / self._held_integral) if self._held_integral else 0.0
        )
        self.result.link_utilisation["mean"] = self._demand_integral / max(self._last_t, 1e-9)
        if self._decode_integral:
            self.result.decode_speed["mean"] = self._speed_integral / self._decode_integral
        self.result.per_route = self._route_table()
        if self.parks:
            self.result.park = self._park_totals()
        if self.steps is not None:
            self.result.step_costs = self._step_totals()
        return self.result

    def _sample(self, t: float) -> None:
        self.result.samples.append((t, self.held))
        self.result.offload_samples.append((t, self.off_held))
        if self.parks:
            self.result.parked_samples.append((t, self.parked_held))

    def _on_arrive(self, session: _Session) -> None:
        self._start_turn(session)

    def _start_turn(self, session: _Session) -> None:
        prompt, output = session.plan[session.turn].prompt, session.plan[session.turn].output
        context, restores = session.tokens, session.park == "parked"
        session.turn_at = self.now
        if session.park == "parking":  # back before the copy finished: its device KV is still there, keep it
            self.parked_held -= session.parked
            session.parked, session.park = 0, ""
        if not self._resize(session, session.tokens + prompt + output):
            if session.state == "new" and self.config.admission == "queue":
                session.state, session.queued_at, session.pending = "queued", self.now, (prompt, output)
                self.queue.append(session)
            else:
                self._restore_failures[session.route.name] += int(restores)
                self._fail(session)
            return
        if restores:
            # the turn's first token waits for the restore; a released session would prefill its context again
            restore_s = self.costs.restore_s(session.parked)
            self._restores[session.route.name].append((restore_s, self._reprefill_s(context)))
            session.pending, session.park = (prompt, output), "restoring"
            self._push(self.now + restore_s, "restored", session)
            return
        self._first_token(session, prompt, output)

    def _admit_queued(self) -> None:
        while self.queue:
            session = self.queue[0]
            prompt, output = session.pending
            if not self._resize(session, prompt + output):
                return
            self.queue.pop(0)
            self.result.queue_waits_s.append(self.now - session.queued_at)
            self._first_token(session, prompt, output)

    def _first_token(self, session: _Session, prompt: int, output: int) -> None:
        """Prefill the turn's prompt, then answer: with step costs the answer waits for the prompt's measured
        prefill (its first token comes then, counted from the turn's start: queue wait and restore included);
        without them a prompt costs no time."""
        if self.steps is None:
            self._answer(session, output)
            return
        session.state = "active"  # its KV is held (and grows) while the prompt prefills
        self.live[session.id] = session
        seconds = self._prefill_s(prompt)
        self._ttfts[session.route.name].append(self.now + seconds - session.turn_at)
        session.pending = (prompt, output)
        self._push(self.now + seconds, "prefilled", session)

    def _on_prefilled(self, session: _Session) -> None:
        if session.state == "active":
            self._answer(session, session.pending[1])

    def _answer(self, session: _Session, output: int) -> None:
        session.state = "active"
        self.live[session.id] = session
        turn = session.plan[session.turn]
        session.turn += 1
        if self.steps is not None:
            # the step it joins: the sessions decoding now and it, over their contexts at mid-answer; fixed for the
            # answer at its start, as the link's share is below
            session.answer_context = session.tokens - output / 2
            step_s, batch = self._step_s(session)
            session.tps = 1 / step_s
        if self.offloads:
            # Over-asked, the link is shared in proportion: every decoding session, this one too, runs at
            # capacity/demand. The speed is fixed for the answer at its start (sessions starting or finishing later
            # do not re-time it): an approximation that keeps one event per answer.
            session.speed = min(1.0, 1.0 / max(self._demand(session.streamed, session.tps), 1e-12))
            self.result.decode_speed["min"] = min(self.result.decode_speed["min"], session.speed)
        session.decoding = self.offloads or self.parks or self.steps is not None
        if self.steps is not None:
            answer_s = output / (session.tps * session.speed)
            self._answers[session.route.name].append((session.tps * session.speed, batch))
        else:
            answer_s = output / (self.config.decode_tps * session.speed)
        if session.decoding:
            # pushed first, so at equal times it is handled before a next turn starts (think_s 0); device strategies
            # that do not park push nothing (no link to share), so their event stream is what it always was
            self._push(self.now + answer_s, "decoded", session)
        if turn.disconnect is not None:
            session.disconnected = True
            self._push(self.now + answer_s * turn.disconnect, "go_idle", session)
        elif session.turns_left > 0:
            self._push(self.now + answer_s + turn.think_s, "next_turn", session)
        else:
            self._push(self.now + answer_s, "go_idle", session)

    def _on_decoded(self, session: _Session) -> None:
        session.decoding = False
        if self.parks and session.state == "active":  # thinking until its next turn, or about to go idle
            self._park(session)

    def _on_next_turn(self, session: _Session) -> None:
        if session.state == "active":
            self._start_turn(session)

    def _on_go_idle(self, session: _Session) -> None:
        """The conversation ended or its client disconnected: release now, or hold (parked, for `park`) until the
        TTL."""
        if session.state != "active":
            return
        session.decoding = False  # a client that went away mid-answer stops its stream
        if self.config.idle_policy == "release":
            self._free(session)
        else:
            if self.parks:
                self._park(session)  # while still active, so making host room never evicts the session itself
            session.state = "idle"
            self._push(self.now + self.config.ttl_s, "expire", session)

    # -- the park policy -----------------------------------------------------------------------------------
    def _park(self, session: _Session) -> None:
        """Start copying a session's device KV (its context's bytes, not its allocation's) to host memory; the
        device allocation is freed when the copy is done. Without host room, after evicting idle sessions that
        hold some, it stays on the device (a park refusal)."""
        nbytes = self.kv_bytes(session.tokens)
        if session.park or not session.bytes or not nbytes:
            return
        if self._short(0, 0, nbytes):
            self._evict_idle(0, 0, nbytes)
        if self._short(0, 0, nbytes):
            self._park_refusals[session.route.name] += 1
            return
        self.parked_held += nbytes
        self._peak_parked = max(self._peak_parked, self.parked_held)
        session.parked, session.park = nbytes, "parking"
        session.park_done_at = self.now + self.costs.park_s(nbytes)
        self._push(session.park_done_at, "parked", session)

    def _on_parked(self, session: _Session) -> None:
        # a copy that was cancelled (its next turn came first) or freed, or an earlier copy's event, does nothing
        if session.park != "parking" or session.park_done_at != self.now:
            return
        self.held -= session.bytes
        session.bytes, session.park = 0, "parked"

    def _on_restored(self, session: _Session) -> None:
        """The restore is done: the host copy goes and the turn's prompt prefills."""
        self.parked_held -= session.parked
        session.parked, session.park = 0, ""
        self._first_token(session, *session.pending)

    def _on_expire(self, session: _Session) -> None:
        if session.state == "idle":
            self._free(session)

    def _fail(self, session: _Session) -> None:
        self._failures[session.route.name][self.short_of] += 1
        self._free(session)

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def _integrate(self, t: float) -> None:
        dt = t - self._last_t
        if dt > 0:
            demand = self._demand()
            for s in self.live.values():
                stats = self._route_time[s.route.name]
                active = s.state == "active"
                stats["active"] += dt * active
                stats["tokens"] += dt * s.tokens * active
                stats["bytes"] += dt * s.bytes
                stats["off_bytes"] += dt * s.off_bytes
                stats["leaked_bytes"] += dt * s.bytes * (not active and s.disconnected)
                stats["parked"] += dt * s.parked
                if s.decoding:  # what the route's answers saw of the link
                    stats["decoding"] += dt
                    stats["speed"] += dt * s.speed
                    stats["demand"] += dt * demand
                    self._decode_integral += dt
                    self._speed_integral += dt * s.speed
                self._used_integral += dt * self.kv_bytes(s.tokens) * (s.park != "parked")
            self._held_integral += dt * self.held
            self._parked_integral += dt * self.parked_held
            self._demand_integral += dt * demand
            self.result.link_utilisation["peak"] = max(self.result.link_utilisation["peak"], demand)
        self._last_t = t

    def _route_table(self) -> dict:
        span = max(self._last_t, 1e-9)
        waits = self.result.queue_waits_s
        table = {}
        for route in self.routes:
            stats = self._route_time[route.name]
            leaked = stats["leaked_bytes"] / stats["bytes"] if stats["bytes"] else 0.0
            failures = {memory: n for memory, n in self._failures[route.name].items() if n}
            speed = stats["speed"] / stats["decoding"] if stats["decoding"] else 1.0
            demand = stats["demand"] / stats["decoding"] if stats["decoding"] else 0.0
            outcome = route_outcome(
                failures,
                leaked,
                bool(waits) and max(waits) > 0,
                self._evictions[route.name],
                self.tier if self.offloads else None,
                self._evicted_for[route.name],
                speed,
                demand,
            )
            table[route.name] = {
                "active_sessions": round(stats["active"] / span, 2),
                "avg_active_tokens": round(stats["tokens"] / stats["active"]) if stats["active"] else 0,
                "kv_bytes": round(stats["bytes"] / span),
                "offload_bytes": round(stats["off_bytes"] / span),
                "evictions": self._evictions[route.name],
                "allocation_failures": failures,
                "decode_speed": round(speed, 3),
                "link_demand": round(demand, 3),
                "outcome": outcome,
            }
            if self.steps is not None:
                table[route.name].update(self._step_figures(self._answers[route.name], self._ttfts[route.name]))
            if self.parks:
                table[route.name].update(
                    {"parked_bytes": round(stats["parked"] / span)}
                    | self._restore_figures(self._restores[route.name])
                    | {
                        "restore_failures": self._restore_failures[route.name],
                        "park_refusals": self._park_refusals[route.name],
                    }
                )
        return table

    @staticmethod
    def _restore_figures(restores: list[tuple[float, float]]) -> dict:
        """Restores, the first-token time they add (mean, p95) and that of the re-prefills they stand for."""
        restore_s, prefill_s = [r for r, _ in restores], [p for _, p in restores]
        return {
            "restores": len(restores),
            "restore_ttft_mean_s": round(statistics.fmean(restore_s), 4) if restores else 0.0,
            "restore_ttft_p95_s": round(_p95(restore_s), 4),
            "reprefill_ttft_mean_s": round(statistics.fmean(prefill_s), 4) if restores else 0.0,
            "reprefill_ttft_p95_s": round(_p95(prefill_s), 4),
        }

    @staticmethod
    def _step_figures(answers: list[tuple[float, int]], ttfts: list[float]) -> dict:
        """Answers, their mean tokens/s per session and batch size, and the first-token time (mean, p95)."""
        return {
            "answers": len(answers),
            "decode_tps": round(statistics.fmean(tps for tps, _ in answers), 2) if answers else 0.0,
            "batch_mean": round(statistics.fmean(batch for _, batch in answers), 2) if answers else 0.0,
            "ttft_mean_s": round(statistics.fmean(ttfts), 4) if ttfts else 0.0,
            "ttft_p95_s": round(_p95(ttfts), 4),
        }

    def _step_totals(self) -> dict:
        """The whole run's step-cost figures (SimResult.step_costs), with what was read outside the measured grid."""
        answers = [a for route in self.routes for a in self._answers[route.name]]
        ttfts = [t for route in self.routes for t in self._ttfts[route.name]]
        largest = self._largest
        return {
            **self._step_figures(answers, ttfts),
            "batch_max": largest["batch"],
            "lookups": dict(self._lookups),
            # lookups the grid did not cover (extended by StepCosts' rule), the largest looked up, and the grid
            "extrapolated": dict(self._outside),
            "largest": {**largest, "context": round(largest["context"])},
            "grid": self.steps.grid(self.spec),
        }

    def _park_totals(self) -> dict:
        """The whole run's park figures (SimResult.park)."""
        restores = [r for route in self.routes for r in self._restores[route.name]]
        return {
            "mean_parked_bytes": round(self._parked_integral / max(self._last_t, 1e-9)),
            "peak_parked_bytes": self._peak_parked,
            **self._restore_figures(restores),
            "restore_failures": sum(self._restore_failures.values()),
            "park_refusals": sum(self._park_refusals.values()),
        }


def simulate(model_config, strategies: list[str], routes: list[Route], config: SimConfig) -> list[SimResult]:
    simulations = [Simulation(model_config, s, routes, config) for s in strategies]  # every strategy checked first
    return [simulation.run() for simulation in simulations]


def simulation_record(
    results: list[SimResult], config: SimConfig, model: str, gpu: str, command: list[str] | None = None
) -> dict:
    """What simulate.json holds: how the run was made (provenance, the GPU named, its KV capacity) and each
    strategy's record. The simulation itself runs on the CPU, whatever GPU it models."""
    meta = {**provenance(model, "cpu", command), "gpu": gpu, "kv_capacity_bytes": round(config.gpu_bytes)}
    if config.park_costs:
        meta |= {"park_costs": config.park_costs.record(), "prefill_tps": config.prefill_tps}
    if config.step_costs:
        meta["step_costs"] = config.step_costs.record()
    return {"meta": meta, "results": [r.record() for r in results]}


def write_simulation(
    folder: Path, results: list[SimResult], config: SimConfig, model: str, gpu: str, command: list[str] | None = None
) -> tuple[Path, Path | None]:
    """Write simulate.json and the plot of KV memory over time into `folder`; return their paths (no plot without
    matplotlib)."""
    path = folder / RECORD_FILE
    path.write_text(json.dumps(simulation_record(results, config, model, gpu, command)) + "\n")
    return path, plot_memory(results, config.gpu_bytes, folder / PLOT_FILE)


def plot_memory(results: list[SimResult], capacity: float, path: Path) -> Path | None:
    """KV memory over time per strategy, with the GPU's KV capacity drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        times, held = zip(*r.samples)
        ax.plot([t / 60 for t in times], [b / 2**30 for b in held], label=r.strategy, linewidth=1.2)
    ax.axhline(capacity / 2**30, color="black", linestyle="--", linewidth=1, label="GPU memory for KV")
    ax.set_xlabel("minutes")
    ax.set_ylabel("KV held (GiB)")
    ax.set_title("KV memory over time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
