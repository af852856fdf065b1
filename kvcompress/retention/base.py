"""Retention: which token positions stay resident."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import Registry

# `keep` returns None to keep everything, a slice to keep the same storage range in every row, or a LongTensor
# [batch, kept] of per-row storage indices (sorted; the same count in every row).


@dataclass(frozen=True)
class Retention:
    """Decides, after each update, which stored tokens stay. Frozen config; per-layer state lives in the layer."""

    name = "base"
    needs_positions = False  # whether `keep` reads the absolute position of every stored token

    @property
    def budget(self) -> int | None:
        """Most tokens resident after an update, or None for unbounded."""
        return None

    def keep(
        self, stored: int, positions: torch.Tensor | None, seen: int, pad: torch.Tensor
    ) -> None | slice | torch.Tensor:
        """stored: tokens held before eviction (this step's included); positions: [batch, stored] absolute positions
        in the padded sequence, given when `needs_positions`; seen: tokens seen so far, this step's included;
        pad: [batch] left-padding length of each row."""
        raise NotImplementedError


RETENTIONS: Registry[Retention] = Registry("retention")
