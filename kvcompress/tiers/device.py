from dataclasses import dataclass

from .base import TIERS, Tier


@TIERS.register("device")
@dataclass(frozen=True)
class DeviceTier(Tier):
    """Everything stays on the compute device (the tier whose bytes are HBM on a GPU)."""
