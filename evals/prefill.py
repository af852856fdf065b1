"""One prefill serves every strategy. Into an empty cache a prefill's attention sees only the step's own K/V, whatever
the strategy (eviction and encoding run after the step), so its K/V and its logits are the same for all of them:
compute them once with the full cache, then hand each strategy's layers those K/V as the prefill would have."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import KVCache, make_cache


@dataclass
class Prefill:
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, K/V [batch, kv heads, tokens, head dim] as stored
    last_logits: torch.Tensor  # [batch, vocab] at the last prompt position

    @classmethod
    @torch.no_grad()
    def of(cls, model, input_ids: torch.Tensor) -> Prefill:
        with make_cache(model, "full") as cache:
            logits = model(input_ids=input_ids, cache=cache, use_cache=True).logits[:, -1]
            return cls([(layer.recent_k.read(), layer.recent_v.read()) for layer in cache.layers], logits)

    def replay(self, cache: KVCache) -> KVCache:
        for layer, (keys, values) in zip(cache.layers, self.kv):
            layer.update(keys, values)
        return cache
