from dataclasses import dataclass

from .base import CODECS, AffineCodec


@CODECS.register("int2")
@dataclass(frozen=True)
class Int2Codec(AffineCodec):
    """Asymmetric 2-bit codes packed four per byte, with a float16 scale and minimum per group of channels of each
    token: the per-token baseline for KIVI's 2-bit keys quantized per channel."""

    bits = 2
