from dataclasses import dataclass

from .base import RETENTIONS
from .snapkv import SnapKVRetention


@RETENTIONS.register("pyramid")
@dataclass(frozen=True)
class PyramidRetention(SnapKVRetention):
    """PyramidKV (Cai et al. 2024, arXiv:2406.02069): SnapKV's selection with budgets that fall linearly with depth,
    since lower layers spread attention widely and upper ones focus it. `budget`/`ratio` is the average per layer:
    the scored part of the budget runs from 2x - x/beta at the first layer to x/beta at the last, so the total over
    layers equals layers x budget (up to rounding)."""

    beta: int = 20
    capacity_by_layer = True

    def __post_init__(self):
        super().__post_init__()
        if self.beta < 1:
            raise ValueError(f"{self.name}:beta must be >= 1, got {self.beta}")

    def capacity(self, seen: int, layer: int = 0, layers: int = 1) -> int:
        average = super().capacity(seen)
        if layers == 1:
            return average
        fixed = self.sinks + self.window
        scored = average - fixed
        low = scored / self.beta
        high = 2 * scored - low
        return fixed + max(1, round(high - (high - low) * layer / (layers - 1)))
