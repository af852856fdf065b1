from dataclasses import dataclass

import torch.nn.functional as F

from .base import RETENTIONS, ScoreRetention


@RETENTIONS.register("tova")
@dataclass(frozen=True)
class TOVARetention(ScoreRetention):
    """TOVA, Token Omission Via Attention (Oren et al. 2024, arXiv:2401.06104): keep the tokens the newest query
    attends to most, its attention averaged over all heads of the layer (the paper's choice over per-head scores), so
    every head keeps the same tokens.

    observe > 1: the last `observe` queries of the step vote, their attention summed, as in SnapKV's observation
    window (Li et al. 2024, arXiv:2404.14469) but still one token set per layer and without pooling. With the question
    inside the prompt the window's queries are the question's end, which knows what to keep; with the question after
    the context the window sees only the context's end, so the default is the paper's (1). The best window depends on
    the prompts: measure it on yours. A decode step has one query, so evicting at decode time votes with that query
    alone.

    kernel > 1: each token's vote is averaged with its neighbours' (`kernel` stored tokens centred on it), so kept
    tokens come with their context, as SnapKV pools. The queries that vote attend to where an answer starts more than
    to its rest: unpooled, a tight budget keeps a number's first digits and drops the others, and the model answers
    it truncated. Averaged rather than SnapKV's max: both help, and the average answered a few more of the default
    model's recall cases where the two were compared. What `kernel=7` keeps: results/eviction/v4-after/eviction.md."""

    observe: int = 1
    kernel: int = 1
    needs = ("attention",)

    def __post_init__(self):
        super().__post_init__()
        if self.observe < 1:
            raise ValueError(f"{self.name}:observe must be >= 1 (the last queries that vote), got {self.observe}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(
                f"{self.name}:kernel must be an odd number >= 1 (tokens averaged, centred), got {self.kernel}"
            )

    @property
    def attention_rows(self) -> int:
        return self.observe

    def score(self, view):
        votes = view.attention[:, :, -self.observe :].sum(dim=2).mean(dim=1, keepdim=True)
        if self.kernel == 1:
            return votes
        return F.avg_pool1d(votes, self.kernel, stride=1, padding=self.kernel // 2, count_include_pad=False)
