"""Capacity planning: KV memory at a target context x concurrency, beside the weights, against a GPU's memory.
Pure arithmetic over a model config (no weights are loaded) and the same analytic formula the cache's measured
bytes are tested against."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch

from .accounting import KVSizer, kv_sizer
from .registry import did_you_mean
from .strategy import StrategySpec, parse_strategy

GIB = 2**30
# Usable memory as sold (GB) in bytes; GPUs report slightly less, so the runtime reserve absorbs the difference.
GPUS = {
    "A10G-24GB": 24e9,
    "L4-24GB": 24e9,
    "RTX4090-24GB": 24e9,
    "A100-40GB": 40e9,
    "L40S-48GB": 48e9,
    "A100-80GB": 80e9,
    "H100-80GB": 80e9,
    "H200-141GB": 141e9,
    "MI300X-192GB": 192e9,
    "B200-192GB": 192e9,
}
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "nf4": 0.5 + 1 / 64 * 0.5}  # nf4: absmax per 64


def parse_memory(text: str, name: str = "--gpu-mem") -> float:
    """'80GiB', '80GB', '2TiB', '141e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*(tib|tb|gib|gb|mib|mb)?\s*", text.lower())
    if not match:
        raise ValueError(f"{name} must look like 80GiB, 80GB, 2TiB or 8e10 (bytes), got {text!r}")
    unit = {"tib": 2**40, "tb": 1e12, "gib": GIB, "gb": 1e9, "mib": 2**20, "mb": 1e6, None: 1}[match.group(2)]
    return float(match.group(1)) * unit


def resolve_gpu_memory(gpu: str, gpu_mem: str | None = None) -> float:
    """Memory of a GPU preset, or of an explicit size such as '80GiB' when one is given."""
    return parse_memory(gpu_mem) if gpu_mem else gpu_memory(gpu)


def kv_capacity(
    config, gpu: str, gpu_mem: str | None = None, weights: str = "bf16", reserve_fraction: float = 0.1
) -> float:
    """Bytes of a GPU (a preset, or `gpu_mem` when given) left for KV once the runtime reserve, a fraction of its
    memory, and the weights are taken: the room the simulator plays sessions in."""
    capacity = resolve_gpu_memory(gpu, gpu_mem) * (1 - reserve_fraction) - weights_bytes(config, weights)
    if capacity <= 0:
        raise ValueError(f"the weights ({weights}) and reserve leave no memory for KV on {gpu_mem or gpu}")
    return capacity


def weights_bytes(config, weights: str = "bf16") -> int:
    if weights not in WEIGHT_BYTES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_BYTES)}, got {weights!r}")
    return round(parameter_count(config) * WEIGHT_BYTES[weights])


def gpu_memory(gpu: str) -> float:
    if gpu not in GPUS:
        hint = did_you_mean(gpu, GPUS)
        raise ValueError(
            f"unknown gpu {gpu!r}; known: {', '.join(GPUS)}" + (f".{hint}" if hint else "; or pass --gpu-mem 80GiB")
        )
    return GPUS[gpu]


_PARAMETER_COUNTS: dict[str, int] = {}


def parameter_count(config) -> int:
    """Parameters counted on the meta device: no memory is allocated for weights. Counted once per config."""
    key = config.to_json_string()
    if key not in _PARAMETER_COUNTS:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        _PARAMETER_COUNTS[key] = sum(p.numel() for p in model.parameters())
    return _PARAMETER_COUNTS[key]


@dataclass(frozen=True)
class PlanRow:
    strategy: str
    bytes_per_token: int
    kv_bytes: int
    weights_bytes: int
    reserve_bytes: int
    gpu_bytes: int
    fits: bool
    max_sessions: int | None
    max_context: int | None  # None: a retention budget or an offload tier caps device KV: context no longer limits it
    verdict: str


def plan(
    config,
    strategies: list[str | StrategySpec],
    gpu_bytes: float,
    context: int,
    sessions: int,
    weights: str = "bf16",
    reserve_fraction: float = 0.1,
    kv_dtype: torch.dtype | None = None,
) -> list[PlanRow]:
    if context <= 0 or sessions <= 0:
        raise ValueError(f"context and sessions must be positive, got context={context}, sessions={sessions}")
    weights_total = weights_bytes(config, weights)
    reserve = round(gpu_bytes * reserve_fraction)
    free = gpu_bytes - weights_total - reserve
    rows = []
    for strategy in strategies:
        spec = parse_strategy(strategy)
        sizer = kv_sizer(config, spec, kv_dtype)
        kv = sizer.device_bytes(context, sessions)
        per_session = sizer.device_bytes(context)
        max_sessions = max(0, math.floor(free / per_session)) if per_session else None  # None: KV stays off device
        max_context = _max_context(sizer, free, sessions)
        fits = kv <= free
        if free <= 0:
            verdict = "weights alone do not fit: shard or quantize the weights"
        elif fits:
            verdict = "fits"
        else:
            verdict = (
                f"allocation failures: {kv / free:.1f}x the free memory; fewer sessions, compress, shard or offload"
            )
        off_device = sizer.bytes(context, sessions) - kv
        if off_device:
            verdict += f"; {spec.tier.memory} holds {off_device / 2**30:,.1f} GiB"
        rows.append(
            PlanRow(
                str(spec),
                sizer.bytes(1),
                kv,
                weights_total,
                reserve,
                round(gpu_bytes),
                fits,
                max_sessions,
                max_context,
                verdict,
            )
        )
    return rows


def _max_context(sizer: KVSizer, free: float, sessions: int) -> int | None:
    """Longest context whose KV for `sessions` sessions fits in `free` bytes (binary search on the formula)."""
    lo, hi = 0, 1 << 24
    if sizer.device_bytes(hi, sessions) <= free:  # a retention budget or an offload tier caps device KV
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sizer.device_bytes(mid, sessions) <= free:
            lo = mid
        else:
            hi = mid - 1
    return lo


SCENARIOS = [
    (8192, 8, "full"),
    (32768, 8, "full"),
    (32768, 32, "full"),
    (32768, 32, "window:window=8192"),
    (32768, 32, "int8"),
    (32768, 32, "fp8"),
]


def sizing_table(
    config, gpu_bytes: float, weights: str = "bf16", reserve_fraction: float = 0.1, kv_dtype: torch.dtype | None = None
) -> list[dict]:
    """The classic rows: context x sessions, a sliding window, int8/fp8, each with KV GB and its lesson."""
    rows = []
    for context, sessions, strategy in SCENARIOS:
        row = plan(config, [strategy], gpu_bytes, context, sessions, weights, reserve_fraction, kv_dtype)[0]
        free = gpu_bytes - row.weights_bytes - row.reserve_bytes
        if row.kv_bytes > gpu_bytes:
            lesson = "KV alone exceeds the GPU: needs sharding or offload"
        elif not row.fits:
            lesson = "memory-bound: allocation failures at this load"
        else:
            lesson = f"fits ({row.kv_bytes / free:.0%} of free memory)"
        rows.append(
            {
                "context": context,
                "sessions": sessions,
                "strategy": row.strategy,
                "kv_gib": row.kv_bytes / GIB,
                "lesson": lesson,
            }
        )
    return rows


def as_json(rows: list[PlanRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def plan_record(model: str, gpu_bytes: float, context: int, sessions: int, weights: str, rows: list[PlanRow]) -> dict:
    """The machine-readable plan (`kvcompress plan --json`): what was asked, and one row per strategy, bytes as
    integers."""
    return {
        "model": model,
        "gpu_bytes": round(gpu_bytes),
        "context": context,
        "sessions": sessions,
        "weights": weights,
        "rows": as_json(rows),
    }
