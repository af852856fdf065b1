from dataclasses import dataclass

import torch.nn.functional as F

from .base import RETENTIONS, ScoreRetention


@RETENTIONS.register("snapkv")
@dataclass(frozen=True)
class SnapKVRetention(ScoreRetention):
    """SnapKV (Li et al. 2024, arXiv:2404.14469): the last `observe` queries of the prompt vote for the tokens they
    attend to (their attention summed, per KV head, the query heads of a group averaged), votes are max-pooled over
    `kernel` neighbouring tokens so that kept tokens come with their context, and each head keeps its top tokens.
    With `question=inside` the observation window is the question: the method is query-aware. A decode step has one
    query, so evicting at decode time (when=budget or interval) votes with that query alone."""

    observe: int = 32
    kernel: int = 7
    needs = ("attention",)

    def __post_init__(self):
        super().__post_init__()
        if self.observe < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(
                f"{self.name}:observe must be >= 1 and {self.name}:kernel an odd number >= 1, got "
                f"observe={self.observe}, kernel={self.kernel}"
            )

    @property
    def attention_rows(self) -> int:
        return self.observe

    def score(self, view):
        votes = view.attention[:, :, -self.observe :].sum(dim=2)
        batch, heads, stored = votes.shape
        pooled = F.max_pool1d(votes.view(batch * heads, 1, stored), self.kernel, stride=1, padding=self.kernel // 2)
        return pooled.view(batch, heads, stored)
