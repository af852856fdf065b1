"""Record a prefill once, replay it into any strategy's cache. Into an empty cache a prefill's attention sees only
the step's own K/V, whatever the strategy (eviction and encoding run after the step), so its K/V and its logits are
the same for all of them: compute them once with the full cache, then hand each strategy's layers those K/V as the
prefill would have (`KVLayer.restore`). The report's harness, the fidelity check and the benchmarks share one prompt
between strategies this way:

    prefill = kvcompress.Prefill.of(model, input_ids, attention=True)
    logits = prefill.fill(model, kvcompress.make_cache(model, "tova:budget=256"))  # as a live prefill would

A score-based retention also reads the prefill's attention. `Prefill.of(..., attention=True)` records what those
read (per layer: the last `ATTENTION_ROWS` queries' attention and, with `mass=True`, each token's attention mass,
which takes every query's weights; from the same seam computation a live prefill runs), and `fill` hands it over
with the K/V; it prefills for real only when that is not exact (a chunked prefill, or a member that observes more
queries than were recorded). A retention that acts after the prompt (`after_prompt`) runs on the replay.

Rows may be left-padded (`attention_mask`): positions then count from each row's first real token, as generate
numbers them, and every layer learns its rows' padding on replay, as it would in a live prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import position_ids, prompt_step_bytes
from .cache import KVCache, make_cache
from .retention.base import Retention, RetentionView
from .strategy import StrategySpec

RECORDED = {"attention", "mass"}  # the needs a recording serves (a retention's `after_prompt` runs on the replay)
ATTENTION_ROWS = 64  # the last prompt queries whose attention is recorded (SnapKV's observation window fits)


@dataclass(frozen=True)
class Recording(Retention):
    """The retention of a recording prefill's cache (no strategy: never registered): it keeps every token, asks the
    seam for the attention of the newest ATTENTION_ROWS queries (and with `mass` every token's attention mass), and
    takes each layer's attention as eviction would see it, into `attention` by layer index."""

    mass: bool = True
    attention: dict[int, torch.Tensor] = field(default_factory=dict, init=False, compare=False, repr=False)
    name = "recording"
    needs_positions = True
    seam = True
    window = 0  # no recent tokens protected: nothing is evicted

    @property
    def needs(self) -> tuple[str, ...]:
        return ("attention", "mass") if self.mass else ("attention",)

    @property
    def attention_rows(self) -> int:
        return ATTENTION_ROWS

    def due(self, stored, seen, layer, layers, step, since_eviction) -> bool:
        return True  # after every step, to see its attention; `keep` keeps everything

    def keep(self, view: RetentionView) -> None:
        self.attention[view.layer] = view.attention
        return None


@dataclass
class Prefill:
    """A recorded prefill: what every layer stored, the last position's logits, and (recorded with attention=True)
    what score-based retentions read of its attention. Make it with `Prefill.of`, hand it to caches with `fill`."""

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
        """Prefill `input_ids` [batch, tokens] (left-padded rows: `attention_mask`) once into a full cache and keep
        what a replay needs; attention=True records the attention too (mass=False: only the last rows', which costs
        one block of weights instead of every query's)."""
        recording = Recording(mass=mass)
        with make_cache(model, StrategySpec(retention=recording) if attention else "full") as cache:
            logits = model(
                input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1, **_padding(attention_mask)
            ).logits[:, -1]
            kv = [(layer.recent_k.read(), layer.recent_v.read()) for layer in cache.layers]
            layers = range(len(cache.layers))
            recorded = [(recording.attention[i], cache.layers[i].mass) for i in layers] if attention else None
            return cls(kv, logits, input_ids, recorded, attention_mask)

    def replay(self, cache: KVCache) -> KVCache:
        """Hand every layer of `cache` the recorded K/V through `update`, as the prompt's forward would (a positional
        retention evicts and a codec encodes as they would live); no attention is replayed."""
        padded = {} if self.attention_mask is None else {"position_ids": position_ids(self.attention_mask)}
        for layer, (keys, values) in zip(cache.layers, self.kv):
            layer.update(keys, values, **padded)
        return cache

    def replays_exactly(self, cache: KVCache) -> bool:
        """Whether `fill` can replay into `cache` (else it prefills for real): not under a chunked prefill, and only
        with the attention the cache's retention reads recorded."""
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
        """Bring `cache` (fresh) to where a prefill of these tokens would, and return the last position's logits [batch,
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
