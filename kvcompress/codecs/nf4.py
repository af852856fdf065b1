"""4-bit codecs on bitsandbytes' blockwise quantisation: NF4 (QLoRA's normal-float levels, arXiv:2305.14314) and its
FP4. One block is one head of one token (block = head_dim), so every token is encoded on its own and appends like
the others; the block's absmax is kept in float32, as bitsandbytes computes it."""

from dataclasses import dataclass

import torch

from .base import CODECS, Codec

BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the block sizes bitsandbytes quantises


def _ops():
    import bitsandbytes  # noqa: F401  (imported on first use: it registers torch.ops.bitsandbytes)

    return torch.ops.bitsandbytes


@dataclass(frozen=True)
class BlockwiseCodec(Codec):
    residual: int = 0

    def __post_init__(self):
        if self.residual < 0:
            raise ValueError(f"{self.name}:residual must be >= 0, got {self.residual}")

    @property
    def residual_tokens(self) -> int:
        return self.residual

    def check(self, head_dim: int, dtype: torch.dtype) -> None:
        if head_dim not in BLOCKS:
            raise ValueError(
                f"{self.name} quantises one head per block: the model's head_dim ({head_dim}) must be one "
                f"of bitsandbytes' block sizes {', '.join(map(str, BLOCKS))}"
            )

    def encode(self, x):
        q, absmax = _ops().quantize_4bit.default(x.contiguous(), x.shape[-1], self.name, torch.uint8)
        return {"q": q.view(*x.shape[:-1], x.shape[-1] // 2), "absmax": absmax.view(*x.shape[:-1], 1)}

    def decode(self, packed, out):
        q, absmax = packed["q"], packed["absmax"]
        shape = [*q.shape[:-1], 2 * q.shape[-1]]
        decoded = _ops().dequantize_4bit.default(
            q.contiguous().view(-1, 1), absmax.contiguous().view(-1), shape[-1], self.name, shape, out.dtype
        )
        out.copy_(decoded)
        return out

    def bytes_per_token(self, head_dim, dtype):
        return head_dim // 2 + torch.float32.itemsize


@CODECS.register("nf4")
@dataclass(frozen=True)
class NF4Codec(BlockwiseCodec):
    """bitsandbytes NF4: 16 levels at the quantiles of a normal distribution, scaled by each block's absmax."""


@CODECS.register("fp4")
@dataclass(frozen=True)
class FP4Codec(BlockwiseCodec):
    """bitsandbytes FP4 (1 sign, 2 exponent, 1 mantissa bit), scaled by each block's absmax."""
