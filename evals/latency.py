"""Prefill and decode timing, gpt-fast style: warm-up excluded, device synchronized before every clock read; and a
cell's latency records (one per round) combined, as the report and its plots read them."""

from __future__ import annotations

import statistics
import time

import torch

from ..static import compiled_step


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def timed_prefill(model, input_ids: torch.Tensor, cache) -> tuple[torch.Tensor, float]:
    """Prefill `input_ids` into `cache` as a server would (the last position's logits only): those logits [batch,
    1, vocab] and the seconds it took (TTFT), the device synchronized around it."""
    sync(input_ids.device)
    start = time.perf_counter()
    logits = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1).logits
    sync(input_ids.device)
    return logits, time.perf_counter() - start


@torch.no_grad()
def time_generation(model, input_ids: torch.Tensor, cache, decode_steps: int) -> dict:
    """Prefill `input_ids` into `cache` (timed: TTFT), then greedy-decode `decode_steps` tokens one at a time, each
    step compiled whole when the cache has a static step (make_cache's compile=True: the first steps compile and
    capture it, so callers drop warm-up steps). Returns ttft_s, decode_s (one entry per step) and, for offloading
    caches, the transfer counters of the decode steps (bytes per direction, seconds copying, seconds the host
    waited)."""
    device = input_ids.device
    logits, ttft = timed_prefill(model, input_ids, cache)
    moved_before = cache.transfer_stats() if hasattr(cache, "transfer_stats") else {}
    step = compiled_step(model) if getattr(cache, "static", False) else model
    decode = []
    for _ in range(decode_steps):
        token = logits.argmax(-1)
        start = time.perf_counter()
        logits = step(input_ids=token, cache=cache, use_cache=True).logits
        sync(device)
        decode.append(time.perf_counter() - start)
    moved = cache.transfer_stats() if hasattr(cache, "transfer_stats") else {}
    transfer = {key: value - moved_before.get(key, 0) for key, value in moved.items()}
    return {"ttft_s": ttft, "decode_s": decode, "transfer": transfer}


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1] if len(values) > 1 else values[0]


def latency_cells(records: list[dict], kind: str = "latency") -> dict[tuple[str, int], dict]:
    """Each (strategy, length)'s latency records (or capacity records, `kind`) as one: its rounds by number
    (`rounds`; records without one are round 0), decode ms p50 over every step of every round, the median round's
    TTFT; bytes, transfers and sessions from round 0."""
    rounds: dict[tuple[str, int], dict[int, dict]] = {}
    for r in records:
        if r.get("kind") == kind and r.get("outcome") == "ok":
            rounds.setdefault((r["strategy"], r["length"]), {})[r.get("round", 0)] = r
    cells = {}
    for key, by_round in rounds.items():
        first = by_round[min(by_round)]
        steps = [t for r in by_round.values() for t in r.get("decode_ms") or []]
        ttfts = [r["ttft_s"] for r in by_round.values() if r.get("ttft_s") is not None]
        p50 = statistics.median(steps) if len(by_round) > 1 and steps else first.get("decode_ms_p50")
        cells[key] = {
            **first,
            "rounds": by_round,
            "decode_ms_p50": p50,
            "ttft_s": statistics.median(ttfts) if ttfts else first.get("ttft_s"),
        }
    return cells
