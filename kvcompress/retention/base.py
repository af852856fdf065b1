"""Retention: which token positions stay resident.

A retention is a frozen config. After each step the layer hands it one `RetentionView` of what it stores and gets
back what to keep: None (everything), a slice (the same storage range in every row), a LongTensor of sorted storage
indices per row [batch, kept] or per (row, KV head) [batch, heads, kept], or a `Kept` (per-head indices plus which of
them are live, for heads that keep fewer tokens than the storage is wide).

Positional members (`window`, `sink`) run inside `update`, before attention. Members that read keys or attention
(`ScoreRetention`) run on the attention seam (`kvcompress/attention.py`), after the step's attention, and see it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..registry import Registry


@dataclass
class RetentionView:
    """What a layer stores, as its retention sees it after a step.

    seen: tokens seen so far (this step's included); stored: tokens held per row (and head), this step's included.
    positions: positional members: [batch, stored] index of each token in the padded sequence; score members:
      [batch, heads, stored] position of each token in its row (its position id), -1 for padding and filler.
    pad: [batch] left padding of each row (positional members). layer, layers: this layer's index and the count.
    attention: [batch, heads, rows, stored] the attention weights of the step's last `attention_rows` queries (or
      fewer: a step has as many as it has tokens), the mean over the query heads that share each KV head (members
      that declare "attention"). mass: [batch, heads, stored] attention accumulated by
      each stored token over every query so far (members that declare "mass"). keys(): [batch, heads, stored, dim]
      the stored keys as attention reads them (decoded; computed on demand). reconstruction: [batch, heads, stored]
      the most attention any query of the context's reconstruction gave each token, over the query heads of its KV
      head (members that declare "reconstruction", scored by their `after_prompt` pass). capacity: [batch] tokens
      each row keeps per head in this layer, where a pass over the whole model set it (kvzip's ranking across layers).
    """

    seen: int
    stored: int
    positions: torch.Tensor | None = None
    pad: torch.Tensor | None = None
    layer: int = 0
    layers: int = 1
    attention: torch.Tensor | None = None
    mass: torch.Tensor | None = None
    keys: Callable[[], torch.Tensor] | None = None
    reconstruction: torch.Tensor | None = None
    capacity: torch.Tensor | None = None


class Kept(NamedTuple):
    index: torch.Tensor  # [batch, heads, width] sorted storage indices
    live: torch.Tensor  # [batch, heads, width] bool: False marks filler that pads a head to the widest one


@dataclass(frozen=True)
class Retention:
    """Decides, after each step, which stored tokens stay. Frozen config; per-layer state lives in the layer."""

    name = "base"
    needs_positions = False  # whether `keep` reads the position of every stored token
    seam = False  # whether it runs on the attention seam (after attention) rather than inside `update`
    needs = ()  # statistics the seam computes for it: "attention", "mass", "reconstruction"
    capacity_by_layer = False  # whether `capacity` depends on the layer (then sizes are summed layer by layer)
    acts_after_prompt = False  # whether `after_prompt` acts once the first forward stored the prompt (a model hook)

    @property
    def evicts(self) -> bool:
        return True

    @property
    def attention_rows(self) -> int:
        """How many of a step's newest queries' attention `keep` reads when it needs "attention" (the seam computes
        only theirs; "mass" needs every query's)."""
        return 1

    def capacity(self, seen: int, layer: int = 0, layers: int = 1) -> int | None:
        """Most tokens a row (and KV head) keeps after a step once `seen` tokens were seen, or None for unbounded."""
        return None

    def due(self, stored: int, seen: int, layer: int, layers: int, step: int, since_eviction: int) -> bool:
        """Whether to evict now: `step` counts the layer's finished steps (0: the first prompt, all its chunks),
        `since_eviction` its steps since the last eviction."""
        capacity = self.capacity(seen, layer, layers)
        return capacity is not None and stored > capacity

    def keep(self, view: RetentionView) -> None | slice | torch.Tensor | Kept:
        raise NotImplementedError

    def state_bytes_per_token(self, kv_heads: int) -> int:
        """Bookkeeping bytes per stored token per layer (positions, score state), counted in kv_bytes()."""
        return torch.int32.itemsize if self.needs_positions else 0

    def check_cache(self, model_or_config: Any, prefill_chunk: int | None) -> None:
        """Refuse, by name, a cache make_cache was asked for that this retention cannot serve (default: none)."""

    def after_prompt(
        self, model: Any, cache: Any, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None
    ) -> None:
        """Act on the prompt once the cache's first forward has stored it, where the member declares
        `acts_after_prompt` (a second pass of the model over the prompt, then eviction): the cache calls it from a
        forward hook, or a replayed prefill does, once per prompt; the model's forwards inside it do not call it again.
        input_ids: [batch, tokens] the prompt (None: the model was called with embeddings); attention_mask: 0 for
        left padding, or None. Default: nothing."""


WHEN = ("budget", "prefill", "interval")


@dataclass(frozen=True)
class ScoreRetention(Retention):
    """Base of the score-based members (kvpress's ScorerPress, on the seam): a member writes `score(view)`, higher
    for tokens worth keeping, [batch, heads, stored] (or [batch, 1, stored] to keep the same tokens in every head);
    this class protects the first `sinks` real tokens of each row and its last `window`, never keeps padding, and
    keeps each head's top `capacity` tokens in position order.

    budget: tokens kept per row and head, or ratio: that fraction of the tokens seen (one of the two).
    when: "prefill" evicts once, after the cache's first step (the prompt; between its chunks under chunked
    prefill), then keeps what follows (the question, the answer): kvpress's protocol; "budget" whenever more than
    the capacity is stored (memory bounded through any number of turns); "interval" after the first step and then
    every `interval` steps (up to `interval` tokens more are held between).
    Defaults (nothing protected, evict after the prompt) are kvpress's, h2o's recent share aside, so results compare
    with kvpress's presses; on the default model, protecting 4 sinks and 32 recent tokens, or evicting at every decode
    step, cost recall at a quarter of the bytes (every protected slot is one the score cannot choose). Set `sinks` to
    keep a system prompt whole, `window` to keep recent turns.
    """

    budget: int = 0
    ratio: float = 0.0
    sinks: int = 0
    window: int = 0
    when: str = "prefill"
    interval: int = 64
    needs_positions = True
    seam = True

    def __post_init__(self):
        name = self.name
        if (self.budget > 0) == (self.ratio > 0):
            raise ValueError(
                f"{name}: give exactly one of {name}:budget=N (tokens kept) or {name}:ratio=r "
                f"(fraction of the tokens seen, in (0, 1]), got budget={self.budget}, ratio={self.ratio}"
            )
        if self.sinks < 0 or self.window < 0:
            raise ValueError(
                f"{name}:sinks and {name}:window must be >= 0, got sinks={self.sinks}, window={self.window}"
            )
        if self.budget and self.budget <= self.sinks + self.window:
            raise ValueError(
                f"{name}:budget ({self.budget}) must exceed {name}:sinks + {name}:window "
                f"({self.sinks} + {self.window}), else no token is chosen by score"
            )
        if self.budget < 0 or not 0 <= self.ratio <= 1:
            raise ValueError(
                f"{name}:ratio must be in (0, 1] and {name}:budget > 0, got ratio={self.ratio}, budget={self.budget}"
            )
        if self.when not in WHEN:
            raise ValueError(f"{name}:when must be one of {', '.join(WHEN)}, got {self.when!r}")
        if self.interval < 1:
            raise ValueError(f"{name}:interval must be >= 1, got {self.interval}")

    def capacity(self, seen: int, layer: int = 0, layers: int = 1) -> int:
        if self.budget:
            return self.budget
        return max(math.ceil(self.ratio * seen), self.sinks + self.window + 1)

    def due(self, stored, seen, layer, layers, step, since_eviction) -> bool:
        if stored <= self.capacity(seen, layer, layers):
            return False
        if self.when == "prefill":
            return step == 0
        if self.when == "interval":
            return step == 0 or since_eviction >= self.interval
        return True

    def state_bytes_per_token(self, kv_heads: int) -> int:
        per_head = torch.int32.itemsize + (torch.float32.itemsize if "mass" in self.needs else 0)
        return kv_heads * per_head

    def score(self, view: RetentionView) -> torch.Tensor:
        raise NotImplementedError

    def recent_tokens(self, capacity: int) -> int:
        """Newest tokens kept whatever their score, out of `capacity`."""
        return self.window

    def protected_scores(self, view: RetentionView, capacity: int) -> torch.Tensor:
        """The member's scores as float32 [batch, heads, stored], +inf where protected (out of `capacity` kept),
        -inf on padding/filler."""
        positions = view.positions
        scores = self.score(view).float().expand(positions.shape)
        newest = positions.amax(dim=(1, 2), keepdim=True)
        protected = (positions >= 0) & ((positions < self.sinks) | (positions > newest - self.recent_tokens(capacity)))
        scores = scores.masked_fill(protected, float("inf"))
        return scores.masked_fill(positions < 0, float("-inf"))

    def keep(self, view: RetentionView) -> torch.Tensor | Kept | None:
        capacity = self.capacity(view.seen, view.layer, view.layers)
        if view.stored <= capacity:
            return None
        return top(self.protected_scores(view, capacity), capacity).sort(dim=-1).values


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores along the last dim; ties go to the newer token (a stable sort over the
    reversed order, where topk's order is unspecified), so kept sets are reproducible. Ties are common: a token
    repeated in the context has the same key norm at every position in the first layer (RoPE rotates)."""
    last = scores.shape[-1] - 1
    return last - scores.flip(-1).sort(dim=-1, descending=True, stable=True).indices[..., :k]


def kept_from(selected: torch.Tensor) -> Kept:
    """The storage a selection [batch, heads, stored] bool needs: as wide as the head (of any row) that selects the
    most, narrower heads padded with their newest unselected tokens as filler (masked out, counted in kv_bytes())."""
    width = int(selected.sum(-1).max())
    index = top(selected.float(), width).sort(dim=-1).values  # the selected, then the newest unselected as filler
    return Kept(index, selected.gather(-1, index))


RETENTIONS: Registry[Retention] = Registry("retention")
