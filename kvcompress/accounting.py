"""Analytic KV sizes, from a model config and a strategy alone (no tensors): what the cache's measured
`kv_bytes()` is tested against, and what the planner extrapolates with."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .codecs import Codec
from .geometry import KVGeometry
from .retention import Retention
from .strategy import StrategySpec, parse_strategy


def bytes_per_token(model_or_config, strategy: str | StrategySpec = "full", dtype: torch.dtype | None = None) -> float:
    """Resident bytes of one stored token of one sequence across all layers, K and V, in encoded form (scales and
    position/score bookkeeping included; the codec's full-precision residual is not)."""
    sizer = kv_sizer(model_or_config, strategy, dtype)
    return sizer.layers * (sizer.encoded_token + sizer.state_token)


@dataclass(frozen=True)
class KVSizer:
    """Per-token constants of one (model, strategy): resident bytes for any number of seen tokens in O(1) (O(layers)
    for a retention whose capacity differs by layer)."""

    layers: int
    full_token: int  # one token of one layer, K and V, in the model dtype
    encoded_token: float  # the same, encoded by the codec
    state_token: int  # retention bookkeeping per token per layer (positions, score state)
    retention: Retention
    codec: Codec  # how many stored tokens are encoded (`encoded_tokens`: none for a lossless codec)
    device_tokens: int | None = None  # tokens per sequence the tier keeps on the device (None: every one)

    def stored(self, seen: int, layer: int = 0) -> int:
        """Tokens layer `layer` holds per sequence (and KV head) once `seen` were seen, evicting whenever over
        capacity (a retention evicting less often holds more between evictions; adakv pads heads to the widest)."""
        capacity = self.retention.capacity(seen, layer, self.layers)
        return seen if capacity is None else min(seen, capacity)

    def bytes(self, seen: int, batch: int = 1) -> int:
        # one layer stands for all unless the retention sizes layers apart (the simulator calls this millions of times)
        layers = range(self.layers) if self.retention.capacity_by_layer else [0]
        total = sum(self._layer_bytes(self.stored(seen, layer)) for layer in layers)
        return round(batch * total * (1 if self.retention.capacity_by_layer else self.layers))

    def _layer_bytes(self, stored: int) -> float:
        encoded = self.codec.encoded_tokens(stored)
        return (stored - encoded) * self.full_token + encoded * self.encoded_token + stored * self.state_token

    def device_bytes(self, seen: int, batch: int = 1) -> int:
        """The part of `bytes` that stays on the device (HBM on a GPU); the rest lives on the host or disk tier."""
        return self.bytes(seen if self.device_tokens is None else min(seen, self.device_tokens), batch)


def kv_sizer(model_or_config, strategy: str | StrategySpec, dtype: torch.dtype | None = None) -> KVSizer:
    spec, geo = parse_strategy(strategy), KVGeometry.of(model_or_config, dtype)
    return KVSizer(
        layers=geo.layers,
        full_token=2 * geo.kv_heads * geo.head_dim * geo.dtype.itemsize,
        encoded_token=2 * geo.kv_heads * spec.codec.bytes_per_token(geo.head_dim, geo.dtype),
        state_token=spec.retention.state_bytes_per_token(geo.kv_heads),
        retention=spec.retention,
        codec=spec.codec,
        device_tokens=spec.tier.device_tokens,
    )


def expected_kv_bytes(
    model_or_config, strategy: str | StrategySpec, seen: int, batch: int = 1, dtype: torch.dtype | None = None
) -> int:
    """Resident bytes after `seen` tokens per sequence: retention caps what is stored, the codec's residual holds the
    most recent tokens in the model dtype, the rest is encoded (`Codec.encoded_tokens`)."""
    return kv_sizer(model_or_config, strategy, dtype).bytes(seen, batch)
