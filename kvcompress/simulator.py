"""A discrete-event simulation of one GPU's KV memory under a mix of routes (sessions arriving, taking turns,
thinking, disconnecting), for each strategy: what a fleet does before it is bought.

Memory per session is the analytic KV size of its resident tokens under the strategy (retention caps them, codecs
shrink them), held through an allocator: `contiguous` reserves the route's longest possible context at admission,
`paged` grows in blocks. Deterministic for a seed.
"""

from __future__ import annotations

import heapq
import math
import random
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .accounting import kv_sizer
from .strategy import StrategySpec, parse_strategy

ROUTE_FIELDS = {"name": str, "rate_per_min": float, "prompt_tokens": list, "output_tokens": list, "turns": list,
                "think_s": list, "disconnect_p": float}


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
            raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(ROUTE_FIELDS)}, arrivals_s")
        def span(name, kind=int):
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
        routes.append(Route(str(entry["name"]), rate, span("prompt_tokens"), span("output_tokens"), turns,
                            span("think_s", float), float(entry["disconnect_p"]),
                            tuple(float(t) for t in entry.get("arrivals_s", ()))))
    return routes


@dataclass
class SimConfig:
    gpu_bytes: float
    minutes: float = 60.0
    seed: int = 0
    allocator: str = "paged"  # or "contiguous"
    block_tokens: int = 16
    admission: str = "reject"  # or "queue"
    idle_policy: str = "ttl"  # or "release": free a session's KV as soon as it ends or disconnects
    ttl_s: float = 120.0
    decode_tps: float = 40.0  # tokens/s one session generates
    sample_s: float = 10.0

    def __post_init__(self):
        choices = {"allocator": ("paged", "contiguous"), "admission": ("reject", "queue"),
                   "idle_policy": ("ttl", "release")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.block_tokens <= 0 or self.minutes <= 0 or self.gpu_bytes <= 0:
            raise ValueError("block_tokens, minutes and gpu memory must be positive")


@dataclass
class _Session:
    id: int
    route: Route
    turns_left: int
    tokens: int = 0  # tokens of context seen so far
    bytes: int = 0  # KV bytes held for it
    state: str = "new"  # new, queued, active, idle, gone
    queued_at: float | None = None
    pending: tuple[int, int] = (0, 0)  # (prompt, output) of a queued first turn
    disconnected: bool = False
    rng: random.Random = field(default_factory=random.Random)  # the session's own draws: same workload everywhere


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


class Simulation:
    def __init__(self, model_config, strategy: str | StrategySpec, routes: list[Route], config: SimConfig):
        self.spec, self.routes, self.config = parse_strategy(strategy), routes, config
        self.sizer = kv_sizer(model_config, self.spec)
        self.rng = random.Random(config.seed)
        self.live: dict[int, _Session] = {}  # sessions holding KV (active or idle)
        self._failures: dict[str, int] = defaultdict(int)
        self._evictions: dict[str, int] = defaultdict(int)
        self.events: list = []
        self.held = 0
        self.queue: list[_Session] = []
        self.result = SimResult(str(self.spec))
        self._seq = 0
        self.now = 0.0
        self._route_time = defaultdict(lambda: defaultdict(float))  # route -> metric -> time integral
        self._last_t = 0.0
        self._used_integral = self._held_integral = 0.0

    # -- memory --------------------------------------------------------------------------------------------
    def kv_bytes(self, tokens: int) -> int:
        return self.sizer.device_bytes(tokens)

    def allocation(self, session: _Session, tokens: int) -> int:
        """Bytes the allocator holds for a session whose context is `tokens` long."""
        if self.config.allocator == "contiguous":
            return self.kv_bytes(session.route.max_tokens)
        blocks = math.ceil(self.sizer.stored(tokens) / self.config.block_tokens)
        return self.kv_bytes(blocks * self.config.block_tokens) if blocks else 0

    def _resize(self, session: _Session, tokens: int) -> bool:
        need = self.allocation(session, tokens) - session.bytes
        if self.held + need > self.config.gpu_bytes:
            self._evict_idle(self.held + need - self.config.gpu_bytes)
        if self.held + need > self.config.gpu_bytes:
            return False
        self.held += need
        session.bytes += need
        session.tokens = tokens
        self.result.peak_bytes = max(self.result.peak_bytes, self.held)
        return True

    def _free(self, session: _Session) -> None:
        self.held -= session.bytes
        session.bytes, session.state = 0, "gone"
        self.live.pop(session.id, None)

    def _evict_idle(self, needed: float) -> None:
        """Under pressure, idle sessions (held for their TTL) go first, oldest first."""
        for session in sorted((s for s in self.live.values() if s.state == "idle"), key=lambda s: s.id):
            if needed <= 0:
                return
            needed -= session.bytes
            self.result.evictions += 1
            self._evictions[session.route.name] += 1
            self._free(session)

    # -- events --------------------------------------------------------------------------------------------
    def _push(self, t: float, kind: str, session: _Session) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, self._seq, kind, session))

    @staticmethod
    def _draw(rng: random.Random, span, kind=int):
        return rng.uniform(*span) if kind is float else rng.randint(*span)

    def run(self) -> SimResult:
        end = self.config.minutes * 60
        sessions = []
        for route in self.routes:
            times = list(route.arrivals_s)
            if not times and route.rate_per_min > 0:
                t = self.rng.expovariate(route.rate_per_min / 60)
                while t < end:
                    times.append(t)
                    t += self.rng.expovariate(route.rate_per_min / 60)
            sessions += [(t, route) for t in times]
        for number, (t, route) in enumerate(sorted(sessions, key=lambda x: x[0])):
            rng = random.Random(f"{self.config.seed}-{number}")
            self._push(t, "arrive", _Session(number, route, self._draw(rng, route.turns), rng=rng))
        t_sample = 0.0
        while self.events:
            t, _, kind, session = heapq.heappop(self.events)
            while t_sample <= t:
                self.result.samples.append((t_sample, self.held))
                t_sample += self.config.sample_s
            self._integrate(t)
            self.now = t
            getattr(self, f"_on_{kind}")(session)
            self._admit_queued()
        self.result.samples.append((t_sample, self.held))
        self.result.final_bytes = self.held
        self.result.allocation_failures = sum(self._failures.values())
        self.result.fragmentation_pct = (100 * (1 - self._used_integral / self._held_integral)
                                         if self._held_integral else 0.0)
        self.result.per_route = self._route_table()
        return self.result

    def _on_arrive(self, session: _Session) -> None:
        self._start_turn(session)

    def _start_turn(self, session: _Session) -> None:
        prompt, output = self._draw(session.rng, session.route.prompt_tokens), self._draw(session.rng, session.route.output_tokens)
        if not self._resize(session, session.tokens + prompt + output):
            if session.state == "new" and self.config.admission == "queue":
                session.state, session.queued_at, session.pending = "queued", self.now, (prompt, output)
                self.queue.append(session)
            else:
                self._fail(session)
            return
        self._answer(session, output)

    def _admit_queued(self) -> None:
        while self.queue:
            session = self.queue[0]
            prompt, output = session.pending
            if not self._resize(session, prompt + output):
                return
            self.queue.pop(0)
            self.result.queue_waits_s.append(self.now - session.queued_at)
            self._answer(session, output)

    def _answer(self, session: _Session, output: int) -> None:
        session.state = "active"
        self.live[session.id] = session
        session.turns_left -= 1
        answer_s = output / self.config.decode_tps
        rng = session.rng
        if rng.random() < session.route.disconnect_p:
            session.disconnected = True
            self._push(self.now + rng.uniform(0, answer_s), "go_idle", session)
        elif session.turns_left > 0:
            self._push(self.now + answer_s + self._draw(rng, session.route.think_s, float), "next_turn", session)
        else:
            self._push(self.now + answer_s, "go_idle", session)

    def _on_next_turn(self, session: _Session) -> None:
        if session.state == "active":
            self._start_turn(session)

    def _on_go_idle(self, session: _Session) -> None:
        """The conversation ended or its client disconnected: release now, or hold until the TTL."""
        if session.state != "active":
            return
        if self.config.idle_policy == "release":
            self._free(session)
        else:
            session.state = "idle"
            self._push(self.now + self.config.ttl_s, "expire", session)

    def _on_expire(self, session: _Session) -> None:
        if session.state == "idle":
            self._free(session)

    def _fail(self, session: _Session) -> None:
        self._failures[session.route.name] += 1
        self._free(session)

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def _integrate(self, t: float) -> None:
        dt = t - self._last_t
        if dt > 0:
            for s in self.live.values():
                stats = self._route_time[s.route.name]
                active = s.state == "active"
                stats["active"] += dt * active
                stats["tokens"] += dt * s.tokens * active
                stats["bytes"] += dt * s.bytes
                stats["leaked_bytes"] += dt * s.bytes * (not active and s.disconnected)
                self._used_integral += dt * self.kv_bytes(s.tokens)
            self._held_integral += dt * self.held
        self._last_t = t

    def _route_table(self) -> dict:
        span = max(self._last_t, 1e-9)
        waits = self.result.queue_waits_s
        table = {}
        for route in self.routes:
            stats = self._route_time[route.name]
            leaked = stats["leaked_bytes"] / stats["bytes"] if stats["bytes"] else 0.0
            if self._failures[route.name]:
                outcome = f"allocation failures ({self._failures[route.name]})"
            elif leaked > 0.3:
                outcome = f"leaked state ({leaked:.0%} of its KV held for disconnected clients)"
            elif waits and max(waits) > 0:
                outcome = "queueing"
            elif self._evictions[route.name]:
                outcome = f"memory-bound ({self._evictions[route.name]} idle sessions evicted before their TTL)"
            else:
                outcome = "healthy"
            table[route.name] = {
                "active_sessions": round(stats["active"] / span, 2),
                "avg_active_tokens": round(stats["tokens"] / stats["active"]) if stats["active"] else 0,
                "kv_bytes": round(stats["bytes"] / span),
                "evictions": self._evictions[route.name],
                "outcome": outcome,
            }
        return table


def simulate(model_config, strategies: list[str], routes: list[Route], config: SimConfig) -> list[SimResult]:
    return [Simulation(model_config, s, routes, config).run() for s in strategies]


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
