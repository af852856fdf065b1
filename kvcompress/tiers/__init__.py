from . import device  # noqa: F401  (registers the members)
from .base import TIERS, Tier

__all__ = ["TIERS", "Tier"]
