from dataclasses import dataclass
from functools import lru_cache

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
        # A 256-entry table lookup widens the codes ~2.7x faster than eager float8 -> float conversion on CPU
        # (measured at 4k tokens x 3 heads x 64), and gives the same values; a compiled step fuses the conversion.
        if torch.compiler.is_compiling():
            return dequantize_scaled(packed["q"], packed["scale"], out)
        table = _widen_table(self.qdtype, out.dtype, out.device)
        return dequantize_scaled(torch.take(table, packed["q"].view(torch.uint8).long()), packed["scale"], out)

    def bytes_per_token(self, head_dim, dtype):
        return head_dim + self.scale_bytes(head_dim)


@lru_cache(maxsize=16)
def _widen_table(qdtype: torch.dtype, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.arange(256, dtype=torch.uint8, device=device).view(qdtype).to(dtype)
