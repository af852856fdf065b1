from dataclasses import dataclass

from .base import RETENTIONS, ScoreRetention


@RETENTIONS.register("tova")
@dataclass(frozen=True)
class TOVARetention(ScoreRetention):
    """TOVA, Token Omission Via Attention (Oren et al. 2024, arXiv:2401.06104): keep the tokens the newest query
    attends to most, its attention averaged over all heads of the layer (the paper's choice over per-head scores), so
    every head keeps the same tokens."""

    needs = ("attention",)

    def score(self, view):
        return view.attention[:, :, -1].mean(dim=1, keepdim=True)
