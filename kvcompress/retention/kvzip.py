from dataclasses import dataclass

import torch

from ..attention import position_ids
from .adakv import shared_across_heads
from .base import RETENTIONS, ScoreRetention


@RETENTIONS.register("kvzip")
@dataclass(frozen=True)
class KVzipRetention(ScoreRetention):
    """KVzip (Kim et al. 2025, arXiv:2505.23416): query-agnostic. After the prompt is prefilled, the model reads it
    again as its own continuation (`reconstruct`: the context's tokens fed after it, `chunk` at a time, attending over
    the cache and storing nothing); a token scores the most attention any query of that reconstruction gave it, over
    the query heads of its KV head, and each KV head keeps its top tokens. What the model must look up to restore the
    context (a passkey, every key of a multi-key haystack) scores high before any question is known, where a
    query-aware member sees only the context's last query. The price is a second pass over the prompt, through float32
    weights for every query of it: time to first token is 2-4x `full`'s on CPU (README), which the report's latency
    rows measure. The paper prefixes a "repeat the context" prompt and ranks across heads and layers; here the context
    follows itself bare (no tokenizer needed), and every head keeps the same count (floor=1, the default), or, with
    floor < 1, each head keeps its top `floor` share of the budget and the layer's other slots go to the best-scored
    tokens of any head (Ada-KV's sharing, `adakv`: storage padded to the widest head, the padding counted). On
    RULER's essay haystack every head keeping the same count lost most multi-key cases (README); whether sharing does
    better at equal bytes is not yet known (its runs so far held a third of the bytes: README).

    The scoring runs once, after the cache's first forward (the prompt, however it was called: `generate`, a manual
    forward, a replayed prefill); so `when` is "prefill", and the whole prompt must be in that first forward (no
    `prefill_chunk`). chunk: context tokens reconstructed per pass; one pass holds [heads, chunk, stored + chunk]
    attention weights a block of queries at a time, and K/V of the chunk beside the cache."""

    chunk: int = 2048
    floor: float = 1.0
    needs = ("reconstruction",)

    def __post_init__(self):
        super().__post_init__()
        if self.when != "prefill":
            raise ValueError(f"{self.name}:when must be prefill (it scores a prefilled context once, by reconstructing "
                             f"it), got {self.when!r}")
        if self.chunk < 1:
            raise ValueError(f"{self.name}:chunk must be >= 1 (context tokens reconstructed per pass), "
                             f"got {self.chunk}")
        if not 0 <= self.floor <= 1:
            raise ValueError(f"{self.name}:floor must be in [0, 1] (the share of its budget each head keeps by its own "
                             f"scores), got {self.floor}")

    def due(self, stored, seen, layer, layers, step, since_eviction) -> bool:
        return False  # `reconstruct` evicts, once the whole model has scored the context

    def score(self, view):
        return view.reconstruction

    def keep(self, view):
        return super().keep(view) if self.floor >= 1 else shared_across_heads(self, view, self.floor)


@torch.no_grad()
def reconstruct(model, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
    """KVzip's scoring pass over `cache`, which holds exactly the prompt `input_ids` [batch, tokens] (left-padded
    rows: `attention_mask`): feed the prompt again after itself, `chunk` tokens at a time, each chunk attending over
    the stored prompt and its own tokens, then evict every layer by the scores. A cache made for a kvzip strategy
    runs it by itself after its first forward (make_cache registers the hook); call it directly after filling a
    cache without the model (a replayed prefill)."""
    cache.reconstructed = True
    layers, tokens = cache.layers, input_ids.shape[1]
    if layers[0].seen != tokens:
        raise ValueError(f"kvzip reconstructs the prompt the cache holds: it holds {layers[0].seen} tokens, "
                         f"input_ids has {tokens}")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    for layer in layers:
        layer.reconstruction = torch.zeros(layer.positions.shape, dtype=torch.float32, device=layer.device)
    chunk = cache.spec.retention.chunk
    for start in range(0, tokens, chunk):
        stop = min(start + chunk, tokens)
        seen = torch.cat([mask, mask[:, start:stop]], dim=1)  # the prompt, then this chunk again after it
        model(input_ids=input_ids[:, start:stop], attention_mask=seen, position_ids=position_ids(seen)[:, tokens:],
              cache=cache,
              use_cache=True, logits_to_keep=1)
    for layer in layers:
        layer.evict_reconstructed()


def reconstruct_after_prompt(model, args: tuple, kwargs: dict, output) -> None:
    """A model forward hook: after the first forward into a kvzip cache, reconstruct what it prefilled."""
    cache = kwargs.get("cache")
    if getattr(cache, "reconstructed", True):  # another cache, or no pass to come (KVCache sets it for kvzip only)
        return
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is None:
        raise ValueError("kvzip reconstructs the prompt from its token ids: call the model with input_ids, not "
                         "inputs_embeds")
    reconstruct(model, cache, input_ids, kwargs.get("attention_mask"))
