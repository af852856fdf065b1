from dataclasses import dataclass

from ..kernels import dequantize_affine, pack_nibbles, quantize_affine, unpack_nibbles
from .base import CODECS, GroupCodec


@CODECS.register("int4")
@dataclass(frozen=True)
class Int4Codec(GroupCodec):
    """Asymmetric 4-bit codes packed two per byte, with a float16 scale and minimum per group of channels."""

    group: int = 32

    def check(self, head_dim, dtype):
        super().check(head_dim, dtype)
        if self.group_size(head_dim) % 2:
            raise ValueError(f"int4:group must be even to pack two codes per byte, got {self.group}")

    def encode(self, x):
        q, scale, lo = quantize_affine(x, self.group_size(x.shape[-1]), bits=4)
        return {"q": pack_nibbles(q), "scale": scale, "min": lo}

    def decode(self, packed, out):
        return dequantize_affine(unpack_nibbles(packed["q"]), packed["scale"], packed["min"], out)

    def bytes_per_token(self, head_dim, dtype):
        return head_dim // 2 + 2 * self.scale_bytes(head_dim)
