"""Kernels: quantization primitives in plain PyTorch (the CPU reference every fused kernel is tested against)."""

from .quant import (
    dequantize_scaled,
    pack_nibbles,
    quantize_affine,
    quantize_scaled,
    scale_groups,
    unpack_nibbles,
)

__all__ = [
    "dequantize_scaled",
    "pack_nibbles",
    "quantize_affine",
    "quantize_scaled",
    "scale_groups",
    "unpack_nibbles",
]
