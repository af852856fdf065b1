from dataclasses import dataclass

from .base import RETENTIONS, ScoreRetention


@RETENTIONS.register("knorm")
@dataclass(frozen=True)
class KnormRetention(ScoreRetention):
    """Key-norm eviction (Devoto et al. 2024, arXiv:2406.11430): keys with a low L2 norm draw high attention, so each
    head keeps its lowest-norm keys. Reads keys only, no attention; norms in float32 because bfloat16 norms tie."""

    def score(self, view):
        return -view.keys().float().norm(dim=-1)
