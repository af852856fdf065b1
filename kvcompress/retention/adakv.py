from dataclasses import dataclass

import torch

from .base import RETENTIONS, Kept, RetentionView, kept_from, top
from .snapkv import SnapKVRetention


@RETENTIONS.register("adakv")
@dataclass(frozen=True)
class AdaKVRetention(SnapKVRetention):
    """Ada-KV (Feng et al. 2024, arXiv:2407.11550) over SnapKV scores: one budget per layer (heads x budget tokens),
    shared adaptively: after every head keeps its own top `floor` fraction of the budget, the layer's remaining
    slots go to the best-scored tokens of whichever heads hold them. Heads then keep different counts; storage is
    padded to the widest head (filler is masked out of attention and counts in kv_bytes(), so the bytes reported are
    the bytes held, not the nominal budget)."""

    floor: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.floor <= 1:
            raise ValueError(f"{self.name}:floor must be in [0, 1], got {self.floor}")

    def keep(self, view: RetentionView) -> Kept | None:
        capacity = self.capacity(view.seen, view.layer, view.layers)
        if view.stored <= capacity:
            return None
        scores = self.protected_scores(view, capacity)
        batch, heads, stored = scores.shape
        scores = scores.scatter(-1, top(scores, int(self.floor * capacity)), float("inf"))  # each head's own share
        chosen = top(scores.flatten(1), heads * capacity)
        selected = torch.zeros(batch, heads * stored, dtype=torch.bool, device=scores.device)
        return kept_from(selected.scatter(1, chosen, True).view(batch, heads, stored))
