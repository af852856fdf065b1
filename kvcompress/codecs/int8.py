from dataclasses import dataclass

import torch

from ..kernels import dequantize_scaled, quantize_scaled
from .base import CODECS, GroupCodec


@CODECS.register("int8")
@dataclass(frozen=True)
class Int8Codec(GroupCodec):
    """Symmetric int8 with a float16 absmax scale per group of channels of each token."""

    def layout(self, head_dim):
        return self.token_layout("int", 8, head_dim)

    def encode(self, x):
        q, scale = quantize_scaled(x, self.group_size(x.shape[-1]), 127.0, torch.int8)
        return {"q": q, "scale": scale}

    def decode(self, packed, out):
        return dequantize_scaled(packed["q"], packed["scale"], out)

    def decode_unscaled(self, packed, out):
        if packed["scale"].shape[-1] != 1:
            return None
        out.copy_(packed["q"])
        return packed["scale"][..., 0], 0

    def bytes_per_token(self, head_dim, dtype):
        return head_dim + self.scale_bytes(head_dim)
