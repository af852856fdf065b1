"""A measured trace replay: the simulator's trace (`plan_sessions`: arrivals, turns, think times, disconnects, output
lengths) played through the real model with real caches, under the simulator's admission and idle policies, beside
the simulator's prediction for the same trace, budget and seed.

The replay runs on a clock that advances by what the model's work takes (measured wall time), and jumps over time
where nothing computes, so a ten-minute trace costs only its compute. One engine, first come first served: each
iteration handles the trace's events that are due, prefills one waiting turn, then runs one decode step for every
session answering, as one batch (`decode_rows`: sessions join and leave between steps). A prefill therefore delays
the step after it, as on a server without chunked prefill.

Memory follows the simulator's rule, so the two differ only where measurement does: a turn is admitted when the
analytic bytes of its whole context (prompt and answer, in the allocator's blocks) fit beside what the live sessions
hold and room for the largest transient a prefill has measured so far, after evicting idle sessions oldest first; a
new session that does not fit is queued or rejected, a next turn that does not fit fails. Each step is foreseen
before it runs: a decode step as the caches' resident bytes, one more token per answering session and per session
a bound of its transient; a prefill as its prompt's bytes and a bound of its transient (`_Transients`: the largest
measured, or the largest measured rate times the step's size, whichever is larger). Where it would go over, idle
sessions are evicted; then a decode step stops the newest answer (`would exceed budget at decode`) and a prefill
waits for running answers to end, or with none fails (`would exceed budget at prefill`). After every step the
caches' measured KV (resident plus the step's transients) is checked against the budget; a step still over it fails
the newest answering session, as does a step that runs out of memory: recorded, never a crash.
"""

from __future__ import annotations

import heapq
import json
import math
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvcompress.batching import decode_rows
from kvcompress.cache import KVCache, make_cache
from kvcompress.provenance import device_name, provenance, provenance_lines
from kvcompress.simulator import PlannedSession, Route, SimConfig, Simulation, Turn, plan_sessions, route_outcome
from kvcompress.strategy import parse_strategy
from kvcompress.tiers import DEVICE_MEMORY

from . import reference_text
from .cost import calibrate
from .latency import percentile

RECORD_FILE, TABLE_FILE = "replay.json", "replay.md"
# The figures compared with the simulator's prediction, and where each is read in a simulation record.
COMPARED = ("peak_kv_bytes", "allocation_failures", "evictions", "queue_wait_p95_s", "ttft_p95_s", "decode_tps")
IDLE_POLICIES = ("ttl", "release")  # park needs a host copy the replay does not make


def compress_time(routes: list[Route], speedup: float) -> list[Route]:
    """The routes with time compressed `speedup` times: arrivals come that much faster and clients think that much
    less; token counts are unchanged."""
    if not speedup > 0:
        raise ValueError(f"speedup must be a positive number, got {speedup!r}")
    return [
        Route(
            r.name,
            r.rate_per_min * speedup,
            r.prompt_tokens,
            r.output_tokens,
            r.turns,
            (r.think_s[0] / speedup, r.think_s[1] / speedup),
            r.disconnect_p,
            tuple(t / speedup for t in r.arrivals_s),
        )
        for r in routes
    ]


@dataclass
class _Live:
    plan: PlannedSession
    cache: KVCache | None = None
    turn: int = 0  # the plan's turn it is on
    state: str = "new"  # new, queued, waiting (for its prefill), answering, thinking, idle, gone
    reserved: int = 0  # bytes the allocator holds for it (the simulator's rule)
    context: int = 0  # tokens of context the allocator counts (prompts and answers so far)
    carry: list[int] = field(default_factory=list)  # its last answer's last token, not yet through the model
    token: int = 0  # the next token it feeds
    produced: int = 0  # tokens of the current answer
    stop_at: int = 0  # tokens after which the current answer ends (its length, or where its client leaves)
    turn_at: float = 0.0
    queued_at: float = 0.0
    admitted_at: float = 0.0
    idle_at: float = 0.0
    disconnected: bool = False
    # filled on the way: every answer's (tokens, seconds from its first token to its last), each turn's first-token
    # time and the decode steps it took part in
    answers: list[tuple[int, float]] = field(default_factory=list)
    first_token_at: float = 0.0

    @property
    def current(self) -> Turn:
        return self.plan.turns[self.turn]

    @property
    def route(self) -> str:
        return self.plan.route.name


class _Transients:
    """What one cache's steps have allocated beside what they keep (a codec's decoded copy, a storage growing by
    copy, a score-based member's scores), and a bound for the next step of a given size: the largest seen, or the
    largest per unit of size (over steps of at least RATE_SIZE, where fixed buffers no longer dominate) times its
    size, whichever is larger."""

    RATE_SIZE = 64

    def __init__(self):
        self.largest, self.per_unit = 0, 0.0

    def add(self, cache: KVCache, size: int) -> None:
        transient = cache.peak_bytes - cache.resident_bytes
        self.largest = max(self.largest, transient)
        if size >= self.RATE_SIZE:
            self.per_unit = max(self.per_unit, transient / size)

    def bound(self, size: int) -> int:
        return max(self.largest, math.ceil(self.per_unit * size))


class Replay:
    """One strategy's replay of `sessions` on `model` under `config` (its gpu_bytes is the KV budget).

    clock(kind, measured_s) gives the seconds a prefill or decode step moves the replay's clock; by default its
    measured wall time. A fixed cost makes the schedule, and so every token generated, the same run after run."""

    def __init__(
        self,
        model: Any,
        strategy: str,
        sessions: list[PlannedSession],
        config: SimConfig,
        text_ids: torch.Tensor,
        clock: Callable[[str, float], float] | None = None,
    ):
        if config.idle_policy not in IDLE_POLICIES:
            raise ValueError(
                f"idle_policy must be one of {', '.join(IDLE_POLICIES)} for a replay, got {config.idle_policy!r}"
            )
        self.model, self.strategy, self.config, self.text = model, strategy, config, text_ids
        self.sizing = Simulation(
            model, strategy, [s.route for s in sessions], config, getattr(model, "kv_dtype", None)
        )  # the simulator's allocator
        self.sessions = [_Live(plan) for plan in sessions]
        self.clock = clock or (lambda kind, seconds: seconds)
        self.now, self.held, self._seq = 0.0, 0, 0
        self.events: list = []
        self.queue: list[_Live] = []
        self.waiting: list[_Live] = []  # admitted turns whose prompt is still to prefill, in order
        self.answering: list[_Live] = []
        self.failures: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))  # route -> reason -> n
        self.evictions: dict[str, int] = defaultdict(int)
        self.queue_waits: list[float] = []
        self.ttfts: dict[str, list[float]] = defaultdict(list)
        self.steps: list[dict] = []  # every decode step: batch, seconds, measured KV
        self.prefills: list[dict] = []
        self.peak_kv = 0  # the most measured KV at once: resident in every live cache plus the step's transients
        self.peak_reserved = 0  # the most the allocator held at once (what the simulator's peak counts)
        # what one cache's step allocates beside what it keeps, as prefills and decode steps have measured it
        self.prefill_transients, self.decode_transients = _Transients(), _Transients()
        self.seam = parse_strategy(strategy).retention.seam
        self.freed: list[dict] = []  # every release: when, why, and the bytes its cache held
        self._integrals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._last_t = 0.0

    # -- the trace ------------------------------------------------------------------------------------------
    def _push(self, t: float, kind: str, session: _Live) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, self._seq, kind, session))

    def run(self) -> dict:
        for session in self.sessions:
            self._push(session.plan.arrival_s, "turn", session)
        started = time.perf_counter()
        while self.events or self.waiting or self.answering or self.queue:
            while self.events and self.events[0][0] <= self.now:
                _, _, kind, session = heapq.heappop(self.events)
                getattr(self, f"_on_{kind}")(session)
            self._admit_queued()
            if self.waiting and self._prefill_fits(self.waiting[0]):
                self._prefill(self.waiting.pop(0))
            if self.answering:
                self._step()
            elif not self.waiting:
                if not self.events:
                    break  # only queued sessions that can never fit are left
                self._advance(self.events[0][0])
        for session in self.queue:  # the trace ended with them still waiting for room
            self._fail(session, "rejected")
        return self._record(time.perf_counter() - started)

    def _advance(self, t: float) -> None:
        dt = t - self._last_t
        if dt > 0:
            for s in self.sessions:
                if s.cache is None:
                    continue
                stats = self._integrals[s.route]
                active = s.state in ("waiting", "answering", "thinking")
                stats["active"] += dt * active
                stats["tokens"] += dt * s.cache.get_seq_length() * active
                stats["bytes"] += dt * s.cache.resident_bytes
                stats["leaked"] += dt * s.cache.resident_bytes * (s.state == "idle" and s.disconnected)
            self._last_t = t
        self.now = max(self.now, t)

    def _on_turn(self, session: _Live) -> None:
        if session.state not in ("new", "thinking"):
            return
        session.turn_at = self.now
        if not self._reserve(session):
            if session.state == "new" and self.config.admission == "queue":
                session.state, session.queued_at = "queued", self.now
                self.queue.append(session)
            else:
                self._fail(session, "rejected" if session.state == "new" else "allocation failure")
            return
        self._admit(session)

    def _on_expire(self, session: _Live) -> None:
        if session.state == "idle":
            self._free(session, "ttl")

    # -- memory ---------------------------------------------------------------------------------------------
    def _reserve(self, session: _Live) -> bool:
        """Hold the allocator's bytes for the turn's whole context, evicting idle sessions if it must."""
        turn = session.current
        end = session.context + turn.prompt + turn.output
        need = self.sizing.allocation(session.plan, end) - session.reserved
        # room is kept once, beside every reservation, for the largest transient a prefill has measured (one runs at
        # a time); a decode step is checked against its batch's own measured transients before it runs (`_step`)
        room = self.config.gpu_bytes - self.prefill_transients.largest
        for idle in sorted((s for s in self.sessions if s.state == "idle"), key=lambda s: s.plan.number):
            if self.held + need <= room:
                break
            self.evictions[idle.route] += 1
            self._free(idle, "evicted")
        if self.held + need > room:
            return False
        self.held += need
        self.peak_reserved = max(self.peak_reserved, self.held)
        session.reserved += need
        session.context += turn.prompt + turn.output
        return True

    def _admit(self, session: _Live) -> None:
        session.state, session.admitted_at = "waiting", self.now
        self.waiting.append(session)

    def _admit_queued(self) -> None:
        while self.queue and self._reserve(self.queue[0]):
            session = self.queue.pop(0)
            self.queue_waits.append(self.now - session.queued_at)
            self._admit(session)

    def _free(self, session: _Live, why: str) -> None:
        if session.cache is not None:
            idle_s = self.now - session.idle_at if session.state == "idle" else 0.0
            self.freed.append(
                {
                    "session": session.plan.number,
                    "t": round(self.now, 4),
                    "why": why,
                    "bytes": session.cache.resident_bytes,
                    "idle_s": round(idle_s, 4),  # how long it had been held idle (ended or disconnected)
                }
            )
            session.cache.close()
            session.cache = None
        self.held -= session.reserved
        session.reserved, session.state = 0, "gone"
        for pool in (self.waiting, self.answering):
            if session in pool:
                pool.remove(session)

    def _fail(self, session: _Live, reason: str) -> None:
        self.failures[session.route][reason] += 1
        self._free(session, reason)

    def _measured(self) -> int:
        """The step's measured KV: every live cache's resident bytes plus its largest transient in the step."""
        return sum(s.cache.peak_bytes for s in self.sessions if s.cache is not None)

    def _begin_step(self) -> None:
        for s in self.sessions:
            if s.cache is not None:
                s.cache.peak_bytes = s.cache.resident_bytes

    def _check_budget(self, kind: str) -> int:
        measured = self._measured()
        self.peak_kv = max(self.peak_kv, measured)
        if measured > self.config.gpu_bytes:  # the reservation fell short: the newest answering session goes
            newest = max(self.answering or self.waiting, key=lambda s: s.admitted_at, default=None)
            if newest is not None:
                self._fail(newest, f"over budget at {kind}")
        return measured

    # -- the model's work -----------------------------------------------------------------------------------
    def _prompt_ids(self, session: _Live) -> list[int]:
        """The turn's prompt: a slice of the text chosen by session and turn (the last answer's last token first)."""
        n, total = session.current.prompt, len(self.text)
        start = (session.plan.number * 7919 + session.turn * 104729) % max(total - n, 1)
        return session.carry + self.text[start : start + n].tolist()

    def _prefill_fits(self, session: _Live) -> bool:
        """Whether the turn's prefill, foreseen (every live cache's resident bytes, the prompt's analytic bytes and
        its transient at the rates prefills have measured), stays within the budget: idle sessions are
        evicted to make it so; failing that it waits for the answers running to end, or, with none, fails."""
        seen = session.cache.get_seq_length() if session.cache is not None else 0
        stored = session.cache.stored_tokens() if session.cache is not None else 0
        n = len(session.carry) + session.current.prompt
        growth = self.sizing.kv_bytes(seen + n) - self.sizing.kv_bytes(seen)
        transient = self.prefill_transients.bound(self._prefill_size(n, stored))
        while True:
            held = sum(s.cache.resident_bytes for s in self.sessions if s.cache is not None)
            if held + growth + transient <= self.config.gpu_bytes:
                return True
            idle = [s for s in self.sessions if s.state == "idle"]
            if not idle:
                break
            victim = min(idle, key=lambda s: s.plan.number)
            self.evictions[victim.route] += 1
            self._free(victim, "evicted")
        if not self.answering:
            self.waiting.remove(session)
            self._fail(session, "would exceed budget at prefill")
        return False

    @torch.no_grad()
    def _prefill(self, session: _Live) -> None:
        self._advance(self.now)
        if session.cache is None:
            session.cache = make_cache(self.model, self.strategy)
        ids = torch.tensor([self._prompt_ids(session)], device=self.model.device)
        seen, stored = session.cache.get_seq_length(), session.cache.stored_tokens()
        positions = torch.arange(seen, seen + ids.shape[1], device=self.model.device).unsqueeze(0)
        self._begin_step()
        started = time.perf_counter()
        try:
            logits = self.model(input_ids=ids, position_ids=positions, cache=session.cache, use_cache=True).logits
        except torch.OutOfMemoryError:
            self._fail(session, "out of memory at prefill")
            return
        seconds = self.clock("prefill", time.perf_counter() - started)
        self._advance(self.now + seconds)
        self.prefills.append({"tokens": ids.shape[1], "s": round(seconds, 6)})
        self.prefill_transients.add(session.cache, self._prefill_size(ids.shape[1], stored))
        self._check_budget("prefill")
        if session.state == "gone":
            return
        session.carry, session.token, session.produced = [], int(logits[0, -1].argmax()), 1
        turn = session.current
        session.stop_at = turn.output if turn.disconnect is None else max(1, math.floor(turn.output * turn.disconnect))
        session.first_token_at = self.now
        self.ttfts[session.route].append(self.now - session.turn_at)
        session.state = "answering"
        self.answering.append(session)
        self._answered_some(session)

    def _prefill_size(self, prompt: int, stored: int) -> int:
        """What a prefill's transient grows with: the tokens it attends over, times its prompt's tokens where the
        retention scores them through the seam (the step's attention weights)."""
        return prompt * (stored + prompt) if self.seam else stored + prompt

    def _expected_step(self) -> int:
        """The next decode step's KV: every live cache's resident bytes, and per answering session one more token
        and a bound of its transient over its stored tokens (`_Transients`)."""
        expected = sum(s.cache.resident_bytes for s in self.sessions if s.cache is not None)
        for s in self.answering:
            seen, stored = s.cache.get_seq_length(), s.cache.stored_tokens()
            expected += self.sizing.kv_bytes(seen + 1) - self.sizing.kv_bytes(seen)
            expected += self.decode_transients.bound(stored + 1)
        return expected

    @torch.no_grad()
    def _step(self) -> None:
        while self.answering and self._expected_step() > self.config.gpu_bytes:
            idle = [s for s in self.sessions if s.state == "idle"]
            if idle:  # idle sessions go first, oldest first, as for admission
                victim = min(idle, key=lambda s: s.plan.number)
                self.evictions[victim.route] += 1
                self._free(victim, "evicted")
            else:  # the newest answer stops before the step would go over
                self._fail(max(self.answering, key=lambda s: s.admitted_at), "would exceed budget at decode")
        if not self.answering:
            return
        batch = list(self.answering)
        self._begin_step()
        started = time.perf_counter()
        try:
            logits = decode_rows(self.model, [s.cache for s in batch], [s.token for s in batch])
        except torch.OutOfMemoryError:
            self._fail(max(batch, key=lambda s: s.admitted_at), "out of memory at decode")
            return
        seconds = self.clock("decode", time.perf_counter() - started)
        self._advance(self.now + seconds)
        measured = self._check_budget("decode")
        for session in batch:
            if session.cache is not None:
                self.decode_transients.add(session.cache, session.cache.stored_tokens())
        self.steps.append({"batch": len(batch), "s": round(seconds, 6), "kv_bytes": measured})
        for row, session in enumerate(batch):
            if session.state != "answering":
                continue
            session.token, session.produced = int(logits[row].argmax()), session.produced + 1
            self._answered_some(session)

    def _answered_some(self, session: _Live) -> None:
        """After a token: the answer goes on, or ends (the client left, or it is complete)."""
        if session.produced < session.stop_at:
            return
        self.answering.remove(session)
        session.answers.append((session.produced, self.now - session.first_token_at))
        turn = session.current
        session.turn += 1
        session.carry = [session.token]  # the answer's last token enters the cache with the next prompt
        if turn.disconnect is not None or session.turn == len(session.plan.turns):
            session.disconnected = turn.disconnect is not None
            if self.config.idle_policy == "release":
                self._free(session, "released")
            else:
                session.state, session.idle_at = "idle", self.now
                self._push(self.now + self.config.ttl_s, "expire", session)
        else:
            session.state = "thinking"
            self._push(self.now + turn.think_s, "turn", session)

    # -- the record -----------------------------------------------------------------------------------------
    def _record(self, wall_s: float) -> dict:
        span = max(self._last_t, 1e-9)
        routes = {}
        for route in dict.fromkeys(s.route for s in self.sessions):
            stats, failures = self._integrals[route], dict(self.failures[route])
            answers = [a for s in self.sessions if s.route == route for a in s.answers]
            leaked = stats["leaked"] / stats["bytes"] if stats["bytes"] else 0.0
            routes[route] = {
                "sessions": sum(s.route == route for s in self.sessions),
                "active_sessions": round(stats["active"] / span, 2),
                "avg_active_tokens": round(stats["tokens"] / stats["active"]) if stats["active"] else 0,
                "kv_bytes": round(stats["bytes"] / span),
                "allocation_failures": failures,
                "evictions": self.evictions[route],
                "ttft_p95_s": round(percentile(self.ttfts[route], 95), 4) if self.ttfts[route] else 0.0,
                **_decode_figures(answers),
                "outcome": route_outcome(
                    {DEVICE_MEMORY: sum(failures.values())} if failures else {},
                    leaked,
                    any(wait > 0 for wait in self.queue_waits),
                    self.evictions[route],
                ),
            }
        ttfts = [t for values in self.ttfts.values() for t in values]
        answers = [a for s in self.sessions for a in s.answers]
        step_s = [step["s"] for step in self.steps]
        tokens = sum(step["batch"] for step in self.steps) + len(self.prefills)
        waits = self.queue_waits or [0.0]
        return {
            "strategy": self.strategy,
            "peak_kv_bytes": self.peak_kv,
            "peak_reserved_bytes": self.peak_reserved,
            "allocation_failures": sum(sum(f.values()) for f in self.failures.values()),
            "failures": dict(sum((Counter(f) for f in self.failures.values()), Counter())),
            "evictions": sum(self.evictions.values()),
            "queue_wait_p50_s": round(statistics.median(waits), 4),
            "queue_wait_p95_s": round(percentile(waits, 95), 4),
            "ttft_p50_s": round(statistics.median(ttfts), 4) if ttfts else 0.0,
            "ttft_p95_s": round(percentile(ttfts, 95), 4) if ttfts else 0.0,
            **_decode_figures(answers),
            "step_ms_p50": round(1e3 * statistics.median(step_s), 3) if step_s else 0.0,
            "step_ms_p95": round(1e3 * percentile(step_s, 95), 3) if step_s else 0.0,
            "batch_mean": round(statistics.fmean(s["batch"] for s in self.steps), 2) if self.steps else 0.0,
            "batch_max": max((s["batch"] for s in self.steps), default=0),
            "tokens_per_s": round(tokens / span, 2),  # every token generated over the trace's clock
            "trace_s": round(span, 2),
            "wall_s": round(wall_s, 2),
            "final_kv_bytes": sum(s.cache.resident_bytes for s in self.sessions if s.cache is not None),
            "released": self.freed,
            "routes": routes,
            "steps": self.steps,
            "prefills": self.prefills,
        }


def _decode_figures(answers: list[tuple[int, float]]) -> dict:
    """Per-session decode speed over answers (an answer's tokens after its first over the seconds they took): the
    mean of every answer's tokens/s (as the simulator reports it), and the p50/p95 of milliseconds per token."""
    per_token = [seconds / (tokens - 1) for tokens, seconds in answers if tokens > 1 and seconds > 0]
    return {
        "answers": len(answers),
        "decode_tps": round(statistics.fmean(1 / s for s in per_token), 2) if per_token else 0.0,
        "decode_ms_p50": round(1e3 * statistics.median(per_token), 3) if per_token else 0.0,
        "decode_ms_p95": round(1e3 * percentile(per_token, 95), 3) if per_token else 0.0,
    }


def relative_errors(measured: dict, predicted: dict) -> dict[str, float | None]:
    """(predicted - measured) / measured for each compared figure; None where the measured figure is 0 and the
    prediction is not (0.0 where both are)."""
    errors = {}
    for name in COMPARED:
        m, p = measured.get(name, 0) or 0, predicted.get(name, 0) or 0
        errors[name] = round((p - m) / m, 4) if m else (0.0 if not p else None)
    return errors


def prediction(model: Any, strategy: str, routes: list[Route], config: SimConfig) -> dict:
    """The simulator's figures for the same trace, in the replay record's names."""
    result = Simulation(model, strategy, routes, config, getattr(model, "kv_dtype", None)).run()
    record = result.record()
    steps = result.step_costs
    return {
        "peak_kv_bytes": record["peak_bytes"],
        "allocation_failures": record["allocation_failures"],
        "evictions": record["evictions"],
        "queue_wait_p95_s": round(record["queue_wait_p95_s"], 4),
        "ttft_p95_s": steps.get("ttft_p95_s", 0.0),
        "decode_tps": steps.get("decode_tps", 0.0),
        "routes": {
            name: {
                k: v for k, v in route.items() if k in ("active_sessions", "avg_active_tokens", "kv_bytes", "outcome")
            }
            for name, route in record["routes"].items()
        },
        "step_costs": {k: v for k, v in steps.items() if k != "grid"},
    }


def replay(
    model: Any,
    tokenizer: Any,
    strategies: list[str],
    routes: list[Route],
    config: SimConfig,
    out: Path,
    meta: dict,
    clock: Callable[[str, float], float] | None = None,
) -> dict:
    """Replay the trace `routes`, `config.minutes` and `config.seed` draw for every strategy, each beside the
    simulator's prediction (priced by config.step_costs); write out/replay.json after each strategy, so an
    interrupted replay keeps every finished one and a rerun with the same settings runs only the rest."""
    for strategy in strategies:
        parse_strategy(strategy)
    sessions = plan_sessions(routes, config.minutes, config.seed)
    if not sessions:
        raise ValueError(f"the routes draw no session in {config.minutes:g} minutes with seed {config.seed}")
    smallest = min(sessions, key=lambda s: s.turns[0].prompt + s.turns[0].output)
    first = smallest.turns[0].prompt + smallest.turns[0].output
    for strategy in strategies:
        sizing = Simulation(model, strategy, routes, config, getattr(model, "kv_dtype", None))
        need = sizing.allocation(smallest, first)
        if need > config.gpu_bytes:
            raise ValueError(
                f"kv_budget {config.gpu_bytes:,.0f} bytes holds no session of the shortest route under {strategy}: "
                f"its first turn ({first} tokens) needs {need:,} bytes"
            )
    path = out / RECORD_FILE
    record = json.loads(path.read_text()) if path.exists() else {"meta": meta, "results": []}
    settings = {k: v for k, v in meta.items() if k in ("model", "settings")}
    if {k: record["meta"].get(k) for k in settings} != settings:
        differs = [k for k in settings if record["meta"].get(k) != settings[k]]
        raise ValueError(f"{path} holds a replay with other {', '.join(differs)}: choose another --out")
    done = {r["strategy"] for r in record["results"]}
    text = tokenizer(reference_text(), return_tensors="pt").input_ids[0] if tokenizer is not None else None
    if text is None:  # random weights: tokens only need to be valid ids
        text = torch.randint(0, model.config.vocab_size, (8192,), generator=torch.Generator().manual_seed(0))
    for strategy in strategies:
        if strategy in done:
            continue
        measured = Replay(model, strategy, sessions, config, text, clock).run()
        predicted = prediction(model, strategy, routes, config)
        record["results"].append(
            {**measured, "predicted": predicted, "relative_error": relative_errors(measured, predicted)}
        )
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record) + "\n")
        tmp.replace(path)
        (out / TABLE_FILE).write_text("\n".join(markdown(record)) + "\n")
    return record


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _error(value: float | None) -> str:
    return "n/a (none measured)" if value is None else f"{value:+.0%}"


FIGURES = (  # name, label, format
    ("peak_kv_bytes", "peak KV", _mib),
    ("allocation_failures", "allocation failures (rejections included)", str),
    ("evictions", "idle sessions evicted", str),
    ("queue_wait_p95_s", "queue wait p95", lambda s: f"{s:.2f} s"),
    ("ttft_p95_s", "TTFT p95", lambda s: f"{s:.2f} s"),
    ("decode_tps", "decode tokens/s per session", lambda v: f"{v:.1f}"),
)


def markdown(record: dict) -> list[str]:
    """replay.md: how the replay was made, then per strategy the measured figures beside the simulator's with the
    relative error of each, and the serving snapshot by route, measured and predicted."""
    meta, settings = record["meta"], record["meta"].get("settings", {})
    lines = ["# Measured trace replay beside the simulator's prediction", ""]
    if "command" in meta:
        lines += provenance_lines(meta)
    if "calibration" in meta:
        lines.append(f"- calibration: 1k-token prefill {meta['calibration']['prefill_1k_s']:.2f} s on this machine")
    if settings:
        lines.append("- settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()))
    for r in record["results"]:
        p, e = r["predicted"], r["relative_error"]
        lines += [
            "",
            f"## `{r['strategy']}`",
            "",
            f"{r['answers']} answers over {r['trace_s']:.0f} s of trace in {r['wall_s']:.0f} s of wall time; decode "
            f"steps {r['step_ms_p50']:.1f} ms p50 / {r['step_ms_p95']:.1f} ms p95 at batch {r['batch_mean']:.2f} mean "
            f"({r['batch_max']} max); TTFT p50 {r['ttft_p50_s']:.2f} s; per-token decode {r['decode_ms_p50']:.1f} ms "
            f"p50 / {r['decode_ms_p95']:.1f} ms p95; {r['tokens_per_s']:.2f} tokens/s over the trace; the allocator's "
            f"peak {_mib(r['peak_reserved_bytes'])}.",
            "",
            "| figure | measured | simulator | relative error |",
            "|---|---|---|---|",
        ]
        lines += [f"| {label} | {fmt(r[name])} | {fmt(p[name])} | {_error(e[name])} |" for name, label, fmt in FIGURES]
        lines += [
            "",
            "| route | sessions | active sessions | avg active tokens | KV memory | outcome "
            "| simulator: active, tokens, KV, outcome |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, route in r["routes"].items():
            q = p["routes"].get(name, {})
            lines.append(
                f"| {name} | {route['sessions']} | {route['active_sessions']} | {route['avg_active_tokens']} | "
                f"{_mib(route['kv_bytes'])} | {route['outcome']} | {q.get('active_sessions')}, "
                f"{q.get('avg_active_tokens')}, {_mib(q.get('kv_bytes', 0))}, {q.get('outcome')} |"
            )
    return lines


def replay_meta(model_name: str, model: Any, config: SimConfig, routes_path: str, speedup: float, command=None) -> dict:
    """What replay.json records of how it was made, with the machine's calibration (a 1k-token prefill) measured
    now. Its settings' minutes and ttl_s are on the replay's clock, after `speedup` divided them."""
    settings = {
        "routes": routes_path,
        "kv_budget": round(config.gpu_bytes),
        "minutes": config.minutes,
        "seed": config.seed,
        "speedup": speedup,
        "allocator": config.allocator,
        "block_tokens": config.block_tokens,
        "admission": config.admission,
        "idle_policy": config.idle_policy,
        "ttl_s": config.ttl_s,
        "step_costs": config.step_costs.source if config.step_costs else None,
    }
    calibration = calibrate(model, device_name(model.device)).record()
    return {**provenance(model_name, model.device, command), "calibration": calibration, "settings": settings}
