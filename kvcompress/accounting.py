"""Analytic KV sizes, from a model config and a strategy alone (no tensors): what the cache's measured
`kv_bytes()` is tested against, and what the planner extrapolates with."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .geometry import KVGeometry
from .strategy import StrategySpec, parse_strategy

POSITION_BYTES = torch.int32.itemsize  # per stored token, per layer, for retentions that track positions


def bytes_per_token(model_or_config, strategy: str | StrategySpec = "full", dtype: torch.dtype | None = None) -> float:
    """Resident bytes of one stored token of one sequence across all layers, K and V, in encoded form (scales and
    position bookkeeping included; the codec's full-precision residual is not)."""
    sizer = kv_sizer(model_or_config, strategy, dtype)
    return sizer.layers * (sizer.encoded_token + sizer.position_token)


@dataclass(frozen=True)
class KVSizer:
    """Per-token constants of one (model, strategy): resident bytes for any number of seen tokens in O(1)."""

    layers: int
    full_token: int  # one token of one layer, K and V, in the model dtype
    encoded_token: float  # the same, encoded by the codec
    position_token: int  # position bookkeeping per token per layer (retentions that track positions)
    budget: int | None
    residual: int | None  # None: the codec is lossless, every stored token stays in the model dtype
    device_tokens: int | None = None  # tokens per sequence the tier keeps on the device (None: every one)

    def stored(self, seen: int) -> int:
        return seen if self.budget is None else min(seen, self.budget)

    def bytes(self, seen: int, batch: int = 1) -> int:
        stored = self.stored(seen)
        recent = stored if self.residual is None else min(stored, self.residual)
        per_layer = recent * self.full_token + (stored - recent) * self.encoded_token + stored * self.position_token
        return round(self.layers * batch * per_layer)

    def device_bytes(self, seen: int, batch: int = 1) -> int:
        """The part of `bytes` that stays on the device (HBM on a GPU); the rest lives on the host or disk tier."""
        return self.bytes(seen if self.device_tokens is None else min(seen, self.device_tokens), batch)


def kv_sizer(model_or_config, strategy: str | StrategySpec, dtype: torch.dtype | None = None) -> KVSizer:
    spec, geo = parse_strategy(strategy), KVGeometry.of(model_or_config, dtype)
    return KVSizer(
        layers=geo.layers,
        full_token=2 * geo.kv_heads * geo.head_dim * geo.dtype.itemsize,
        encoded_token=2 * geo.kv_heads * spec.codec.bytes_per_token(geo.head_dim, geo.dtype),
        position_token=POSITION_BYTES if spec.retention.needs_positions else 0,
        budget=spec.retention.budget,
        residual=None if spec.codec.lossless else spec.codec.residual_tokens,
        device_tokens=spec.tier.device_tokens,
    )


def expected_kv_bytes(
    model_or_config, strategy: str | StrategySpec, seen: int, batch: int = 1, dtype: torch.dtype | None = None
) -> int:
    """Resident bytes after `seen` tokens per sequence: retention caps what is stored, the codec's residual holds the
    most recent tokens in the model dtype, the rest is encoded."""
    return kv_sizer(model_or_config, strategy, dtype).bytes(seen, batch)
