from dataclasses import dataclass

from .base import RETENTIONS, ScoreRetention


@RETENTIONS.register("h2o")
@dataclass(frozen=True)
class H2ORetention(ScoreRetention):
    """H2O, Heavy-Hitter Oracle (Zhang et al. 2023, arXiv:2306.14048): each KV head keeps the tokens that have
    accumulated the most attention over every query so far (the heavy hitters) plus the most recent tokens, `recent`
    of the budget left after the sinks (the paper splits it evenly). Without the recent share the running sums favour
    the oldest tokens, which every later query has attended to: on the default model that kept no needle answerable.
    The running sums are score state: float32 per stored token and head, counted in kv_bytes()."""

    recent: float = 0.5
    needs = ("mass",)

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.recent < 1:
            raise ValueError(
                f"{self.name}:recent must be in [0, 1) (the share of the budget kept for the newest "
                f"tokens; the rest goes to heavy hitters), got {self.recent}"
            )

    def recent_tokens(self, capacity: int) -> int:
        return max(self.window, int(self.recent * (capacity - self.sinks)))

    def score(self, view):
        return view.mass
