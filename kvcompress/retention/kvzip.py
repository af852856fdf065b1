from dataclasses import dataclass
from typing import Any

import torch

from ..attention import position_ids
from .base import RETENTIONS, Kept, RetentionView, ScoreRetention, kept_from, top

LAYERS = ("ranked", "equal")


@RETENTIONS.register("kvzip")
@dataclass(frozen=True)
class KVzipRetention(ScoreRetention):
    """KVzip (Kim et al. 2025, arXiv:2505.23416): query-agnostic. After the prompt is prefilled, the model reads it
    again as its own continuation (`reconstruct`: the context's tokens fed after it, `chunk` at a time, attending over
    the cache and storing nothing); a token scores the most attention any query of that reconstruction gave it, over
    the query heads of its KV head, and each KV head keeps its top tokens. What the model must look up to restore the
    context (a passkey, every key of a multi-key haystack) scores high before any question is known, where a
    query-aware member sees only the context's last query. The price is a second pass over the prompt, with the
    float32 weights of every query of it (a block of queries at a time): the report's TTFT column measures it, and
    experiments/bench_kvzip.py times it against a plain prefill (results/kvzip-pass/).

    layers="ranked" (the default): the paper ranks every (layer, head, token) score of the model together and keeps
    the top; stored densely, a layer is as wide as its head that holds most of that top, and every head of it keeps
    that many tokens (the narrower heads' extra tokens are their next best, where padding would hold nothing), the
    widths summing to layers x budget: the bytes of layers="equal", where every layer keeps `budget`. The copy reads
    some layers' heads across the whole context and others hardly at all, and ranking moves the budget to the
    former, where RULER's multi-key haystacks need it (docs/measurements.md). The paper
    prefixes a "repeat the context" prompt; here the context follows itself bare (no tokenizer needed).

    The scoring runs once, after the cache's first forward (`after_prompt`: the prompt, however it was called:
    `generate`, a manual forward, a replayed prefill); so `when` is "prefill", and the whole prompt must be in that
    first forward (no `prefill_chunk`). chunk: context tokens reconstructed per pass; one pass holds [heads, chunk,
    stored + chunk] attention weights a block of queries at a time, and K/V of the chunk beside the cache."""

    chunk: int = 2048
    layers: str = "ranked"
    needs = ("reconstruction",)
    acts_after_prompt = True

    def __post_init__(self):
        super().__post_init__()
        if self.when != "prefill":
            raise ValueError(
                f"{self.name}:when must be prefill (it scores a prefilled context once, by reconstructing "
                f"it), got {self.when!r}"
            )
        if self.chunk < 1:
            raise ValueError(
                f"{self.name}:chunk must be >= 1 (context tokens reconstructed per pass), got {self.chunk}"
            )
        if self.layers not in LAYERS:
            raise ValueError(
                f"{self.name}:layers must be one of {', '.join(LAYERS)} (ranked: every layer's heads' "
                f"scores ranked together, layers as wide as their share; equal: every layer keeps the "
                f"budget), got {self.layers!r}"
            )

    def check_cache(self, model_or_config: Any, prefill_chunk: int | None) -> None:
        """The reconstruction runs the model over the prompt after the first forward: it needs the model (make_cache
        hooks it) and the whole prompt in that forward."""
        if not hasattr(model_or_config, "register_forward_hook"):
            raise ValueError(
                f"{self.name} reconstructs the prompt with the model after prefilling it: pass the "
                "model to make_cache, not its config"
            )
        if prefill_chunk is not None:
            raise ValueError(
                f"{self.name} scores the whole prompt once it is prefilled, so a chunked prefill "
                f"would hold it whole anyway: leave prefill_chunk out, got prefill_chunk={prefill_chunk}"
            )

    def after_prompt(
        self, model: Any, cache: Any, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None
    ) -> None:
        """Reconstruct the prompt the first forward prefilled (`reconstruct`), which evicts every layer."""
        if input_ids is None:
            raise ValueError(
                "kvzip reconstructs the prompt from its token ids: call the model with input_ids, not inputs_embeds"
            )
        reconstruct(model, cache, input_ids, attention_mask)

    def due(self, stored, seen, layer, layers, step, since_eviction) -> bool:
        return False  # `reconstruct` evicts, once the whole model has scored the context

    def score(self, view):
        return view.reconstruction

    def keep(self, view: RetentionView) -> torch.Tensor | Kept | None:
        if view.capacity is None:
            return super().keep(view)
        scores = self.protected_scores(view, int(view.capacity.min()))
        order = top(scores, view.stored)  # each head's tokens, best first
        ranked = (torch.arange(view.stored, device=scores.device) < view.capacity[:, None, None]).expand_as(order)
        return kept_from(torch.zeros_like(ranked).scatter(-1, order, ranked))

    def layer_capacities(self, views: list[RetentionView]) -> list[torch.Tensor | None]:
        """Tokens each row keeps per head in each layer ([batch] per layer; None: the member's own capacity). With
        layers="ranked", the paper's ranking of every (layer, head, token) score, in dense storage: a layer is as wide
        as its head that holds most of the model's top scores, and every head of it keeps that many. At a threshold,
        a layer's width is the number of ranks j at which its best head's j-th score clears it; so the widths are the
        counts by layer of the model's top layers x budget such profiles (each layer's heads' sorted scores, the
        maximum over heads at each rank), at least one token a layer."""
        capacity = self.capacity(views[0].seen)
        if self.layers == "equal" or views[0].stored <= capacity:
            return [None] * len(views)
        profiles = [
            self.protected_scores(view, capacity).sort(dim=-1, descending=True).values.amax(dim=1) for view in views
        ]  # [batch, stored] per layer
        device = profiles[0].device
        layer_of = torch.cat([torch.full((p.shape[1],), i, device=device) for i, p in enumerate(profiles)])
        chosen = layer_of[top(torch.cat(profiles, dim=1), capacity * len(views))]  # each chosen rank's layer
        widths = torch.zeros(len(chosen), len(views), dtype=torch.long, device=device)
        return list(widths.scatter_add_(1, chosen, torch.ones_like(chosen)).clamp(min=1).unbind(1))


@torch.no_grad()
def reconstruct(model, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
    """KVzip's scoring pass over `cache`, which holds exactly the prompt `input_ids` [batch, tokens] (left-padded
    rows: `attention_mask`): feed the prompt again after itself, `chunk` tokens at a time, each chunk attending over
    the stored prompt and its own tokens, then evict every layer by the scores. A cache made for a kvzip strategy
    runs it by itself after its first forward (`after_prompt`, from the hook make_cache registers); call it directly
    after filling a cache without the model's forward."""
    cache.after_prompt_due = False
    layers, tokens = cache.layers, input_ids.shape[1]
    if layers[0].seen != tokens:
        raise ValueError(
            f"kvzip reconstructs the prompt the cache holds: it holds {layers[0].seen} tokens, input_ids has {tokens}"
        )
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    for layer in layers:
        layer.reconstruction = torch.zeros(layer.positions.shape, dtype=torch.float32, device=layer.device)
    chunk = cache.spec.retention.chunk
    for start in range(0, tokens, chunk):
        stop = min(start + chunk, tokens)
        seen = torch.cat([mask, mask[:, start:stop]], dim=1)  # the prompt, then this chunk again after it
        model(
            input_ids=input_ids[:, start:stop],
            attention_mask=seen,
            position_ids=position_ids(seen)[:, tokens:],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    views = [layer.reconstruction_view() for layer in layers]
    for layer, view, capacity in zip(layers, views, cache.spec.retention.layer_capacities(views)):
        view.capacity = capacity
        layer.evict_reconstructed(view)
