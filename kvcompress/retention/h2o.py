from dataclasses import dataclass

from .base import RETENTIONS, ScoreRetention


@RETENTIONS.register("h2o")
@dataclass(frozen=True)
class H2ORetention(ScoreRetention):
    """H2O, Heavy-Hitter Oracle (Zhang et al. 2023, arXiv:2306.14048): each KV head keeps the tokens that have
    accumulated the most attention over every query so far (the heavy hitters) plus the recent `window`. The running
    sums are score state: float32 per stored token and head, counted in kv_bytes()."""

    needs = ("mass",)

    def score(self, view):
        return view.mass
