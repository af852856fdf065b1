from dataclasses import dataclass

from .base import RETENTIONS, Retention


@RETENTIONS.register("full")
@dataclass(frozen=True)
class FullRetention(Retention):
    """Keep every token (the baseline all savings are measured against)."""

    def keep(self, stored, positions, seen, pad):
        return None
