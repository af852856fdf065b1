"""Analytic KV sizes, from a model config and a strategy alone (no tensors): what the cache's measured
`kv_bytes()` is tested against, and what the planner extrapolates with."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import decoder_config
from .strategy import StrategySpec, parse_strategy

POSITION_BYTES = torch.int32.itemsize  # per stored token, per layer, for retentions that track positions


def config_dtype(config) -> torch.dtype:
    """The dtype a config declares for its weights (and so its KV), float32 when it declares none."""
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


@dataclass(frozen=True)
class KVGeometry:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, model_or_config, dtype: torch.dtype | None = None) -> KVGeometry:
        config = decoder_config(model_or_config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.num_hidden_layers, kv_heads, head_dim, dtype or config_dtype(config))


def bytes_per_token(model_or_config, strategy: str | StrategySpec = "full", dtype: torch.dtype | None = None) -> float:
    """Resident bytes of one stored token of one sequence across all layers, K and V, in encoded form (scales and
    position bookkeeping included; the codec's full-precision residual is not)."""
    spec, geo = parse_strategy(strategy), KVGeometry.of(model_or_config, dtype)
    per_layer = 2 * geo.kv_heads * spec.codec.bytes_per_token(geo.head_dim, geo.dtype)
    if spec.retention.needs_positions:
        per_layer += POSITION_BYTES
    return geo.layers * per_layer


def expected_kv_bytes(
    model_or_config, strategy: str | StrategySpec, seen: int, batch: int = 1, dtype: torch.dtype | None = None
) -> int:
    """Resident bytes after `seen` tokens per sequence: retention caps what is stored, the codec's residual holds the
    most recent tokens in the model dtype, the rest is encoded."""
    spec, geo = parse_strategy(strategy), KVGeometry.of(model_or_config, dtype)
    budget = spec.retention.budget
    stored = seen if budget is None else min(seen, budget)
    recent = stored if spec.codec.lossless else min(stored, spec.codec.residual_tokens)
    full_token = 2 * geo.kv_heads * geo.head_dim * geo.dtype.itemsize
    encoded_token = bytes_per_token(model_or_config, spec, geo.dtype) / geo.layers
    if spec.retention.needs_positions:
        encoded_token -= POSITION_BYTES
    per_layer = recent * full_token + (stored - recent) * encoded_token
    if spec.retention.needs_positions:
        per_layer += stored * POSITION_BYTES
    return round(geo.layers * batch * per_layer)
