from dataclasses import dataclass

from ..kernels import pack_nibbles, quantize_affine, scale_groups, unpack_nibbles
from .base import CODECS, GroupCodec


@CODECS.register("int4")
@dataclass(frozen=True)
class Int4Codec(GroupCodec):
    """Asymmetric 4-bit codes packed two per byte (channels c and c + head_dim / 2), with a float16 scale and minimum
    per group of channels."""

    group: int = 32

    def check(self, head_dim, dtype):
        super().check(head_dim, dtype)
        if head_dim % 2:
            raise ValueError(f"int4 packs two channels per byte: the model's head_dim ({head_dim}) must be even")

    def encode(self, x):
        q, scale, lo = quantize_affine(x, self.group_size(x.shape[-1]), bits=4)
        return {"q": pack_nibbles(q), "scale": scale, "min": lo}

    def decode(self, packed, out):
        return scale_groups(unpack_nibbles(packed["q"], out), packed["scale"], lo=packed["min"])

    def bytes_per_token(self, head_dim, dtype):
        return head_dim // 2 + 2 * self.scale_bytes(head_dim)
