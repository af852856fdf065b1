"""One decode step for several sessions, each keeping its own KVCache, as one batch: the model's projections and MLPs
run once over every session's token, and each session attends over its own cache (a ragged batch: contexts of any
length, no padding copied). Sessions join and leave between steps simply by being passed or not: nothing is merged
or split, so a session's cache after a batched step is the cache it would have had decoding alone.

transformers' continuous batching cannot host these caches (it keeps every request in its own paged cache with its
own attention), so a server replaying traffic over kvcompress caches batches them here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import _take_pending, hand_over, route
from .cache import KVCache


class _RowsLayer(CacheLayerMixin):
    """Layer `index` of every session's cache, for one step: `update` gives each session its own row, and the step's
    attention (routed here by the seam) runs row by row over each session's own keys."""

    def __init__(self, caches: list[KVCache], index: int):
        super().__init__()
        self.layers = [cache.layers[index] for cache in caches]
        self.is_initialized = True
        self._stash: list | None = None

    @property
    def seen(self) -> int:
        return max(layer.seen for layer in self.layers)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0  # the model's mask is not read: every row attends over all it stores

    def get_max_length(self) -> int:
        return -1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        position_ids = kwargs.get("kwargs", kwargs).get("position_ids")
        rows = []
        for i, layer in enumerate(self.layers):
            row_kwargs = {"kwargs": {"position_ids": position_ids[i : i + 1]}} if position_ids is not None else {}
            keys, values = layer.update(key_states[i : i + 1], value_states[i : i + 1], **row_kwargs)
            # a layer the seam manages handed its step over: this layer runs its attention below instead
            seam = _take_pending(keys) is layer
            rows.append((layer, seam, keys, values))
        self._stash = rows
        hand_over(self, key_states)
        return key_states, value_states

    def attend(self, query: torch.Tensor, attention_mask, scaling: float, kwargs: dict[str, Any]) -> torch.Tensor:
        """Each session's step over its own cache: [batch, q, query heads, dim]."""
        rows, self._stash = self._stash, None
        position_ids = kwargs.get("position_ids")
        outputs = []
        for i, (layer, seam, keys, values) in enumerate(rows):
            q = query[i : i + 1]
            if seam:
                row_kwargs = {**kwargs, "position_ids": position_ids[i : i + 1]} if position_ids is not None else kwargs
                outputs.append(layer.attend(q, None, scaling, row_kwargs))
            else:
                out = F.scaled_dot_product_attention(
                    q, keys.to(q.dtype), values.to(q.dtype), scale=scaling, enable_gqa=True
                )
                outputs.append(out.transpose(1, 2))
        return torch.cat(outputs, dim=0)


class RowsCache(Cache):
    """The caches of the sessions decoding at one step, routed as one batch (row i is caches[i])."""

    def __init__(self, caches: list[KVCache]):
        if not caches:
            raise ValueError("caches must name at least one session's cache")
        super().__init__(layers=[_RowsLayer(caches, i) for i in range(len(caches[0].layers))])


@torch.no_grad()
def decode_rows(model: Any, caches: list[KVCache], tokens: list[int]) -> torch.Tensor:
    """One decode step: session i's next token is `tokens[i]`, at the position after everything its cache has seen.
    Returns the next-token logits [sessions, vocab]. Each cache is updated as if its session had decoded alone."""
    if len(tokens) != len(caches):
        raise ValueError(f"tokens must give one token per cache: {len(tokens)} tokens for {len(caches)} caches")
    if any(cache.planned_batch != 1 for cache in caches):
        raise ValueError("each cache must hold one session: make every session's cache with batch_size=1")
    if any(cache.static for cache in caches):
        raise ValueError("a compile=True cache steps alone: make the sessions' caches without compile")
    route(model)  # the seam hands each step's attention to the rows layer
    device = model.device
    ids = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(1)
    positions = torch.tensor([[cache.get_seq_length()] for cache in caches], dtype=torch.long, device=device)
    out = model(input_ids=ids, position_ids=positions, cache=RowsCache(caches), use_cache=True)
    return out.logits[:, -1]
