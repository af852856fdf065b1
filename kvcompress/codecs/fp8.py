from dataclasses import dataclass

import torch

from ..kernels import dequantize_scaled, quantize_scaled
from .base import CODECS, GroupCodec

FP8_FORMATS = {"e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2"}


@CODECS.register("fp8")
@dataclass(frozen=True)
class Fp8Codec(GroupCodec):
    """float8 (e4m3 or e5m2) with a float16 scale per group of channels of each token, so the scale follows the
    data instead of being frozen at the first token (as transformers' Fp8QuantizedLayer does)."""

    format: str = "e4m3"

    def __post_init__(self):
        super().__post_init__()
        if self.format not in FP8_FORMATS:
            raise ValueError(f"fp8:format must be one of {', '.join(FP8_FORMATS)}, got {self.format!r}")
        if not hasattr(torch, FP8_FORMATS[self.format]):
            raise ValueError(f"fp8:format {self.format!r} needs torch.{FP8_FORMATS[self.format]}, absent in torch {torch.__version__}")

    @property
    def qdtype(self) -> torch.dtype:
        return getattr(torch, FP8_FORMATS[self.format])

    def encode(self, x):
        q, scale = quantize_scaled(x, self.group_size(x.shape[-1]), torch.finfo(self.qdtype).max, self.qdtype)
        return {"q": q, "scale": scale}

    def decode(self, packed, out):
        q = packed["q"]
        if torch.compiler.is_compiling() or q.device.type != "cpu":  # compiled or CUDA code converts float8 at speed
            return dequantize_scaled(q, packed["scale"], out)
        return dequantize_scaled(_as_float16(q, self.format), packed["scale"], out, _FLOAT16_FACTOR[self.format])

    def bytes_per_token(self, head_dim, dtype):
        return head_dim + self.scale_bytes(head_dim)


# what restores the value of a code laid out as float16 bits by _as_float16: float16's exponent bias (15) less the
# format's (e4m3: 7, e5m2: 15), as a power of two
_FLOAT16_FACTOR = {"e4m3": 2.0**8, "e5m2": 1.0}


def _as_float16(q: torch.Tensor, format: str) -> torch.Tensor:
    """float8 codes as float16 bit patterns worth code / _FLOAT16_FACTOR[format], by integer shifts: eager float8 ->
    float conversion on CPU is ~10x slower (and a 256-entry table lookup ~5x; at 4k tokens x 3 heads x 64).
    e5m2 is float16's upper byte; e4m3fn's s eeee mmm becomes s 0eeee mmm0000000 (every finite code, subnormals
    included: float16 holds them exactly). The codes are sign-extended to int16, which a left shift by 7 leaves in
    bit 14 of a negative code: cleared."""
    bits = q.view(torch.int8).to(torch.int16)
    if format == "e5m2":
        return bits.bitwise_left_shift_(8).view(torch.float16)
    return bits.bitwise_left_shift_(7).bitwise_and_(~0x4000).view(torch.float16)
