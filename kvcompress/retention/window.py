from dataclasses import dataclass

from .base import RETENTIONS, Retention


@RETENTIONS.register("window")
@dataclass(frozen=True)
class WindowRetention(Retention):
    """Sliding window: keep the last `window` tokens, rolling at every step (queries of the current step still see
    everything that was resident when it began, plus the step's own tokens)."""

    window: int = 1024

    def __post_init__(self):
        if self.window <= 0:
            raise ValueError(f"window:window must be > 0, got {self.window}")

    def capacity(self, seen: int, layer: int = 0, layers: int = 1) -> int:
        return self.window

    def keep(self, view):
        return slice(view.stored - self.window, view.stored) if view.stored > self.window else None
