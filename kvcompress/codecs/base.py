"""Codec: how each kept token is stored. Encoded tensors are [batch, heads, tokens, m] so tokens append and evict
along dim 2 like plain K/V."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import Registry

Packed = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Codec:
    name = "base"
    lossless = False  # a lossless codec keeps tokens as they are and is never asked to encode

    @property
    def residual_tokens(self) -> int:
        """Most recent tokens kept in the model dtype before they are encoded."""
        return 0

    def check(self, head_dim: int, dtype: torch.dtype) -> None:
        """Raise ValueError naming the parameter if this codec cannot store heads of `head_dim` in `dtype`."""

    def encode(self, x: torch.Tensor) -> Packed:
        raise NotImplementedError

    def decode(self, packed: Packed, out: torch.Tensor) -> torch.Tensor:
        """Write the decoded tokens into `out` (a [b, h, t, d] view, model dtype) and return it."""
        raise NotImplementedError

    def decode_unscaled(self, packed: Packed, out: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        """For a codec with one scale per token and head: write the codes into `out` (float32) unscaled and return
        (scale [b, h, t], exponent), the decoded token being out * scale * 2**exponent, so that attention can scale its
        few rows of scores and weights instead of every decoded channel. None for any other codec (then `decode`)."""
        return None

    def bytes_per_token(self, head_dim: int, dtype: torch.dtype) -> float:
        """Encoded bytes of one token of one head, for K or V, scales included."""
        raise NotImplementedError


@dataclass(frozen=True)
class GroupCodec(Codec):
    """A quantizer with one scale per `group` channels of each token (0, or a group wider than the head: one per
    token and head), and an
    optional full-precision residual of the most recent `residual` tokens (KIVI, arXiv:2402.02750)."""

    group: int = 0
    residual: int = 0

    def __post_init__(self):
        if self.group < 0:
            raise ValueError(f"{self.name}:group must be >= 0 (0 = whole head), got {self.group}")
        if self.residual < 0:
            raise ValueError(f"{self.name}:residual must be >= 0, got {self.residual}")

    @property
    def residual_tokens(self) -> int:
        return self.residual

    def group_size(self, head_dim: int) -> int:
        return min(self.group or head_dim, head_dim)

    def check(self, head_dim: int, dtype: torch.dtype) -> None:
        if head_dim % self.group_size(head_dim):
            raise ValueError(f"{self.name}:group ({self.group}) must divide the model's head_dim ({head_dim})")

    def scale_bytes(self, head_dim: int) -> int:
        return head_dim // self.group_size(head_dim) * torch.finfo(torch.float16).bits // 8


CODECS: Registry[Codec] = Registry("codec")
