"""One prefill serves every strategy. Into an empty cache a prefill's attention sees only the step's own K/V, whatever
the strategy (eviction and encoding run after the step), so its K/V and its logits are the same for all of them:
compute them once with the full cache, then hand each strategy's layers those K/V as the prefill would have.

A score-based retention also reads the prefill's attention. `Prefill.of(..., attention=True)` records what those
read (per layer: the last `ATTENTION_ROWS` queries' attention and, with `mass=True`, each token's attention mass,
which takes every query's weights; from the same seam computation a live prefill runs), and `fill` hands it over
with the K/V; it prefills for real only when that is not exact (a chunked prefill, or a member that observes more
queries than were recorded).

Rows may be left-padded (`attention_mask`): positions then count from each row's first real token, as generate
numbers them, and every layer learns its rows' padding on replay, as it would in a live prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import position_ids, prompt_step_bytes
from ..cache import KVCache, make_cache
from ..retention.h2o import H2ORetention
from ..retention.tova import TOVARetention
from ..strategy import StrategySpec

RECORDED = {"attention", "mass"}  # the needs a recording serves (a retention's `after_prompt` runs on the replay)
ATTENTION_ROWS = 64  # the last prompt queries whose attention is recorded (SnapKV's observation window fits)
_RECORDERS = {
    True: StrategySpec(retention=H2ORetention(budget=2**62)),  # never evict; h2o keeps mass
    False: StrategySpec(retention=TOVARetention(budget=2**62, observe=ATTENTION_ROWS)),
}


@dataclass
class Prefill:
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, K/V [batch, kv heads, tokens, head dim] as stored
    last_logits: torch.Tensor  # [batch, vocab] at the last prompt position
    input_ids: torch.Tensor  # [batch, tokens] what was prefilled
    attention: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer, if recorded: last rows, mass
    attention_mask: torch.Tensor | None = None  # [batch, tokens], 0 for left padding; None: no padding

    @classmethod
    @torch.no_grad()
    def of(
        cls,
        model,
        input_ids: torch.Tensor,
        attention: bool = False,
        attention_mask: torch.Tensor | None = None,
        mass: bool = True,
    ) -> Prefill:
        with make_cache(model, _RECORDERS[mass] if attention else "full") as cache:
            for layer in cache.layers:
                layer.capture_rows = ATTENTION_ROWS if attention else 0
            logits = model(
                input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1, **_padding(attention_mask)
            ).logits[:, -1]
            kv = [(layer.recent_k.read(), layer.recent_v.read()) for layer in cache.layers]
            recorded = [(layer.captured, layer.mass) for layer in cache.layers] if attention else None
            return cls(kv, logits, input_ids, recorded, attention_mask)

    def replay(self, cache: KVCache) -> KVCache:
        padded = {} if self.attention_mask is None else {"position_ids": position_ids(self.attention_mask)}
        for layer, (keys, values) in zip(cache.layers, self.kv):
            layer.update(keys, values, **padded)
        return cache

    def replays_exactly(self, cache: KVCache) -> bool:
        retention = cache.spec.retention
        if not retention.seam:
            return True
        if cache.layers[0].prefill_chunk is not None:
            return False
        recorded = RECORDED & set(retention.needs)
        return not recorded or (
            self.attention is not None
            and retention.attention_rows <= ATTENTION_ROWS
            and ("mass" not in recorded or self.attention[0][1] is not None)
        )

    @torch.no_grad()
    def fill(self, model, cache: KVCache) -> torch.Tensor:
        """Bring `cache` to where a prefill of these tokens would, and return the last position's logits [batch,
        vocab]: replayed where exact, prefilled for real otherwise."""
        if not self.replays_exactly(cache):
            return model(
                input_ids=self.input_ids, cache=cache, use_cache=True, logits_to_keep=1, **_padding(self.attention_mask)
            ).logits[:, -1]
        compute = self.last_logits.dtype
        if not cache.spec.retention.seam:
            self.replay(cache)
            cache.after_prompt(model, self.input_ids, self.attention_mask)
            return self.last_logits
        positions = None  # a seam layer holds each token's position in its row, -1 for padding
        if self.attention_mask is not None:
            positions = position_ids(self.attention_mask).to(torch.int32).masked_fill(self.attention_mask == 0, -1)
        retention = cache.spec.retention
        recorded = self.attention if RECORDED & set(retention.needs) else [(None, None)] * len(self.kv)
        padded = self.attention_mask is not None and bool((self.attention_mask == 0).any())
        read = retention.attention_rows if "attention" in retention.needs else 0
        for layer, (keys, values), (rows, mass) in zip(cache.layers, self.kv, recorded):
            # what a live prefill holds: the K/V, the weights of the queries the member reads, the mask
            transient = prompt_step_bytes(
                keys, model.config.num_attention_heads, read, padded, compute, mass="mass" in retention.needs
            )
            layer.restore(keys, values, rows, mass, compute, transient, positions)
        cache.after_prompt(model, self.input_ids, self.attention_mask)  # what the model's forward hook would run
        return self.last_logits


def _padding(attention_mask: torch.Tensor | None) -> dict:
    """What a forward over left-padded rows takes beside the ids: the mask and generate's position ids."""
    return (
        {}
        if attention_mask is None
        else {"attention_mask": attention_mask, "position_ids": position_ids(attention_mask)}
    )
