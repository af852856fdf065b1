from dataclasses import dataclass

import torch

from ..kernels import dequantize_scaled, quantize_scaled, scale_groups
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
            raise ValueError(
                f"fp8:format {self.format!r} needs torch.{FP8_FORMATS[self.format]}, "
                f"absent in torch {torch.__version__}"
            )

    @property
    def qdtype(self) -> torch.dtype:
        return getattr(torch, FP8_FORMATS[self.format])

    def layout(self, head_dim):
        return self.token_layout(self.format, 8, head_dim)

    def encode(self, x):
        q, scale = quantize_scaled(x, self.group_size(x.shape[-1]), torch.finfo(self.qdtype).max, self.qdtype)
        return {"q": q, "scale": scale}

    def decode(self, packed, out):
        q, scale = packed["q"], packed["scale"]
        if not _lays_bits(q, out):
            return dequantize_scaled(q, scale, out)
        return scale_groups(out, scale, 2.0 ** _lay_codes(q, self.format, out))

    def decode_unscaled(self, packed, out):
        q, scale = packed["q"], packed["scale"]
        if scale.shape[-1] != 1 or not _lays_bits(q, out):
            return None
        return scale[..., 0], _lay_codes(q, self.format, out)

    def bytes_per_token(self, head_dim, dtype):
        return head_dim + self.scale_bytes(head_dim)


# the bits of a float: its integer view, mantissa bits and exponent bias; of a float8 format: mantissa bits and bias
_FLOAT_LAYOUTS = {
    torch.float32: (torch.int32, 23, 127),
    torch.bfloat16: (torch.int16, 7, 127),
    torch.float16: (torch.int16, 10, 15),
}
_FP8_LAYOUTS = {"e4m3": (3, 7), "e5m2": (2, 15)}


def _lays_bits(q: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether decoding lays the codes' bits in (`_lay_codes`): eager CPU code into a float it knows, where torch's own
    float8 conversion is far slower than these integer passes; compiled or CUDA code converts float8 at speed."""
    return q.device.type == "cpu" and out.dtype in _FLOAT_LAYOUTS and not torch.compiler.is_compiling()


def _lay_codes(q: torch.Tensor, format: str, out: torch.Tensor) -> int:
    """Writes float8 codes q into `out` as out's own float bits worth code / 2**e, and returns e (the exponent
    biases' difference). Integer operations in out's own memory: eager float8 -> float conversion on CPU is far
    slower, and building float16 bits in a temporary to widen into `out` takes a pass and an allocation more. The
    code is sign-extended and shifted so that its mantissa ends where out's does; the copies of its sign between its
    exponent and out's sign bit are cleared. Every finite code is exact, subnormals included (they land as out's
    subnormals: ~1e-4 of the default model's codes); infinity and NaN codes, which encode makes only from non-finite
    inputs (whose scale is then non-finite too), do not stay non-finite on their own."""
    view, mantissa, bias = _FLOAT_LAYOUTS[out.dtype]
    code_mantissa, code_bias = _FP8_LAYOUTS[format]
    shift = mantissa - code_mantissa
    bits = out.view(view).copy_(q.view(torch.int8)).bitwise_left_shift_(shift)
    sign_copies = (1 << (torch.iinfo(view).bits - 1)) - (1 << (7 + shift))
    if sign_copies:
        bits.bitwise_and_(~sign_copies)
    return bias - code_bias
