from dataclasses import dataclass

from .base import RETENTIONS, Retention


@RETENTIONS.register("full")
@dataclass(frozen=True)
class FullRetention(Retention):
    """Keep every token (the baseline all savings are measured against)."""

    @property
    def evicts(self) -> bool:
        return False

    def keep(self, view):
        return None
