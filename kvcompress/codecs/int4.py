from dataclasses import dataclass

from .base import CODECS, AffineCodec


@CODECS.register("int4")
@dataclass(frozen=True)
class Int4Codec(AffineCodec):
    """Asymmetric 4-bit codes packed two per byte (channels c and c + head_dim / 2), with a float16 scale and minimum
    per group of channels."""

    bits = 4
