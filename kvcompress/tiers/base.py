"""Tier: where stored tokens live. The layer hands every tensor it keeps to its tier and asks it back before
attention, so host and disk tiers (issue 4) slot in without touching retention or codecs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import Registry


@dataclass(frozen=True)
class Tier:
    name = "base"

    def place(self, tensor: torch.Tensor) -> torch.Tensor:
        """Move a tensor the layer keeps to this tier; returns the resident handle."""
        raise NotImplementedError

    def fetch(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Bring a resident tensor to the compute device."""
        raise NotImplementedError


TIERS: Registry[Tier] = Registry("tier")
