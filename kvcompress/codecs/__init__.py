from . import fp8, int2, int4, int8, kivi, nf4, none  # noqa: F401  (registers the members)
from .base import CODECS, Codec, Packed

__all__ = ["CODECS", "Codec", "Packed"]
