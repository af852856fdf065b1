from dataclasses import dataclass

import torch

from .base import RETENTIONS, Kept, RetentionView, ScoreRetention, top
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

    def keep(self, view):
        return shared_across_heads(self, view, self.floor)


def shared_across_heads(retention: ScoreRetention, view: RetentionView, floor: float) -> Kept | None:
    """Ada-KV's choice from a member's protected scores [batch, heads, stored] (None: everything fits): each head
    keeps its own top `floor` x capacity, the layer's other slots (heads x capacity in all) go to the best-scored
    tokens of any head; storage is as wide as the widest head, narrower heads padded with their newest unselected
    tokens as filler."""
    capacity = retention.capacity(view.seen, view.layer, view.layers)
    if view.stored <= capacity:
        return None
    scores = retention.protected_scores(view, capacity)
    batch, heads, stored = scores.shape
    own = top(scores, int(floor * capacity))
    scores = scores.scatter(-1, own, float("inf"))
    chosen = top(scores.flatten(1), heads * capacity)
    selected = torch.zeros(batch, heads * stored, dtype=torch.bool, device=scores.device)
    selected = selected.scatter(1, chosen, True).view(batch, heads, stored)
    width = int(selected.sum(-1).max())
    index = top(selected.float(), width).sort(dim=-1).values  # the selected, then the newest unselected as filler
    return Kept(index, selected.gather(-1, index))
