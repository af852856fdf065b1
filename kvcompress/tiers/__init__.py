from . import device, disk, host  # noqa: F401  (registers the members)
from .base import DEVICE_MEMORY, TIERS, DevicePart, Part, Store, Tier, merge_bytes, no_tokens, take_tokens

__all__ = ["DEVICE_MEMORY", "TIERS", "DevicePart", "Part", "Store", "Tier", "merge_bytes", "no_tokens", "take_tokens"]
