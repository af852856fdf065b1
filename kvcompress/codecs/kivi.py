import math
from dataclasses import dataclass

import torch

from ..kernels.quant import CodeLayout, gather_channels, pack_codes, quantize_affine, spread_channels, unpack_codes
from .base import CODECS, AffineCodec, Packed


@CODECS.register("kivi")
@dataclass(frozen=True)
class KiviCodec(AffineCodec):
    """KIVI (Liu et al. 2024, arXiv:2402.02750): asymmetric `bits`-bit codes, keys quantized per channel (one float16
    scale and minimum per channel for each group of `group` tokens: keys have outlier channels, which a per-token
    scale spreads over every code of the token) and values per token (per group of `group` channels, as int4/int2).

    The most recent tokens (up to `residual`) stay in the model dtype; once more are held, the oldest enter the codes
    a whole key group at a time, so every key group is complete. An eviction that drops encoded tokens breaks their
    groups: the cache decodes what is left and encodes it again in whole groups (`token_block`), so a token a
    retention keeps can be quantized more than once."""

    bits: int = 2
    group: int = 32
    residual: int = 128

    def __post_init__(self):
        if self.bits not in (2, 4):
            raise ValueError(f"kivi:bits must be 2 or 4, got {self.bits}")
        if self.group < 1:
            raise ValueError(
                f"kivi:group must be >= 1 (tokens per key scale, channels per value scale), got {self.group}"
            )
        if self.residual < self.group or self.residual % self.group:
            raise ValueError(
                f"kivi:residual must be a multiple of kivi:group ({self.group}) and at least one group: the recent "
                f"tokens held in the model dtype, which enter the codes a key group at a time; got {self.residual}"
            )

    @property
    def token_block(self) -> int:
        return self.group

    def layout(self, head_dim):
        values = CodeLayout("affine", self.bits, "token", self.group_size(head_dim))
        return CodeLayout("affine", self.bits, "channel", self.group), values

    def encode_pair(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[Packed, Packed]:
        """Keys per channel over groups of `group` tokens (their count a multiple of it), values per token."""
        if keys.shape[2] % self.group:
            raise ValueError(
                f"kivi encodes keys a group of {self.group} tokens at a time (kivi:group): got {keys.shape[2]} tokens"
            )
        # quantize_affine groups along the last axis: channels last, then back
        q, scale, lo = quantize_affine(keys.transpose(-1, -2), self.group, self.bits)
        codes = pack_codes(q.transpose(-1, -2).contiguous(), self.bits)
        spread = (spread_channels(t.transpose(-1, -2), self.group) for t in (scale, lo))
        return dict(zip(("q", "channel_scale", "channel_min"), (codes, *spread))), self.encode(values)

    def decode(self, packed, out):
        if "channel_scale" not in packed:  # values: per token
            return super().decode(packed, out)
        channels = out.shape[-1]
        scale, lo = (gather_channels(packed[name], self.group, channels) for name in ("channel_scale", "channel_min"))
        groups = unpack_codes(packed["q"], self.bits, out).unflatten(2, (-1, self.group))
        groups.mul_(scale.to(out.dtype)[:, :, :, None]).add_(lo.to(out.dtype)[:, :, :, None])
        return out

    def bytes_per_token(self, head_dim, dtype):
        """K's and V's alike: the codes, and two float16s for each of ceil(head_dim / group) scale slots a token (a
        key group's channels spread over its tokens; a token's value groups, as many)."""
        slots = math.ceil(head_dim / self.group)
        return head_dim * self.bits // 8 + 2 * slots * torch.float16.itemsize
