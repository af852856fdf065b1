"""Codec: how each kept token is stored. Encoded tensors are [batch, heads, tokens, m] so tokens append and evict
along dim 2 like plain K/V."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.quant import CodeLayout, pack_codes, quantize_affine, scale_groups, unpack_codes
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

    @property
    def token_block(self) -> int:
        """Tokens that enter the codes together (1: each on its own). Over 1 (KIVI's key groups), an eviction that
        drops encoded tokens re-encodes what is left in whole blocks."""
        return 1

    def encoded_tokens(self, stored: int) -> int:
        """How many of `stored` tokens (the oldest) are held encoded: all but the `residual_tokens` most recent, in
        whole `token_block`s, so that at most `residual_tokens` stay in the model dtype (a lossless codec: none)."""
        if self.lossless or stored <= self.residual_tokens:
            return 0
        return -(-(stored - self.residual_tokens) // self.token_block) * self.token_block

    def layout(self, head_dim: int) -> tuple[CodeLayout, CodeLayout] | None:
        """How the codes of K and of V are laid out at `head_dim` (what the fused decode paths read), or None for a
        codec whose codes only `decode` reads (the Triton kernel then refuses it; the torch path decodes)."""
        return None

    def check(self, head_dim: int, dtype: torch.dtype) -> None:
        """Raise ValueError naming the parameter if this codec cannot store heads of `head_dim` in `dtype`."""

    def encode(self, x: torch.Tensor) -> Packed:
        raise NotImplementedError

    def encode_pair(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[Packed, Packed]:
        """The encoding of K and of V, in one `encode` call where they have the same shape: a decode step encodes one
        token, so its cost is the codec's per-op overhead, paid once instead of twice (a codec that encodes each
        token on its own gives the same codes). A codec that encodes K and V apart overrides this."""
        if keys.shape != values.shape:
            return self.encode(keys), self.encode(values)
        packed, batch = self.encode(torch.cat([keys, values])), keys.shape[0]
        return {key: t[:batch] for key, t in packed.items()}, {key: t[batch:] for key, t in packed.items()}

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

    def token_layout(self, code: str, bits: int, head_dim: int) -> tuple[CodeLayout, CodeLayout]:
        """K and V both with codes of `bits` bits and scales per group of channels of each token."""
        layout = CodeLayout(code, bits, "token", self.group_size(head_dim))
        return layout, layout


@dataclass(frozen=True)
class AffineCodec(GroupCodec):
    """Asymmetric `bits`-bit codes packed 8 // bits per byte (`pack_codes`), with a float16 scale and minimum per
    group of channels of each token."""

    bits = 4
    group: int = 32

    def check(self, head_dim, dtype):
        super().check(head_dim, dtype)
        if head_dim % (8 // self.bits):
            raise ValueError(
                f"{self.name} packs {8 // self.bits} channels per byte: the model's head_dim ({head_dim}) must be a "
                f"multiple of {8 // self.bits}"
            )

    def layout(self, head_dim):
        return self.token_layout("affine", self.bits, head_dim)

    def encode(self, x):
        q, scale, lo = quantize_affine(x, self.group_size(x.shape[-1]), self.bits)
        return {"q": pack_codes(q, self.bits), "scale": scale, "min": lo}

    def decode(self, packed, out):
        return scale_groups(unpack_codes(packed["q"], self.bits, out), packed["scale"], lo=packed["min"])

    def bytes_per_token(self, head_dim, dtype):
        return head_dim * self.bits // 8 + 2 * self.scale_bytes(head_dim)


CODECS: Registry[Codec] = Registry("codec")
