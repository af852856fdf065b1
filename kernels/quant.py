"""Group-wise quantization of KV tensors [batch, heads, tokens, head_dim].

Groups run along head_dim, so every token is encoded on its own: appending a token never touches the history.
Scales are float16: 2 bytes per group, rounded before quantizing so encode and decode use the same value.
"""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.float16
_TINY = torch.finfo(SCALE_DTYPE).tiny  # smallest normal float16: keeps all-zero groups from dividing by zero


def _groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """[..., d] as [..., d // group, group] (a view; with one group per row, an added axis)."""
    return x.unsqueeze(-2) if group == x.shape[-1] else x.unflatten(-1, (x.shape[-1] // group, group))


def quantize_scaled(x: torch.Tensor, group: int, qmax: float, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric: q = x / scale with scale = absmax(group) / qmax, stored as `qdtype` (int8 codes are rounded,
    float8 codes are cast). Returns (q [..., d], scale [..., d // group])."""
    g = _groups(x.float(), group)
    scale = (torch.linalg.vector_norm(g, float("inf"), dim=-1) / qmax).to(SCALE_DTYPE).clamp_min(_TINY)
    q = g / scale[..., None]  # float32 / float16: computed in float32
    if not qdtype.is_floating_point:
        # no clamp needed: rounding absmax / qmax to float16 shrinks it by at most 2**-11, so |q| <= 127.07
        q = q.round_()
    return q.to(qdtype).flatten(-2), scale


def dequantize_scaled(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Writes q * scale into `out` (any strides, the model dtype) and returns it."""
    out.copy_(q)  # widened in place, then scaled in place: a mixed-dtype mul would widen into a temporary first
    return scale_groups(out, scale)


def scale_groups(
    out: torch.Tensor, scale: torch.Tensor, factor: float = 1.0, lo: torch.Tensor | None = None
) -> torch.Tensor:
    """Multiplies each group of `out`'s channels in place by its scale [..., d // group] times `factor` (a power of
    two that restores codes laid in rescaled, fp8's on CPU, so the product stays exact), then adds its minimum `lo`
    (like scale; affine codes), and returns `out`."""
    group = out.shape[-1] // scale.shape[-1]
    largest = torch.finfo(out.dtype).max
    # scale * factor can overflow (e4m3 into float32 or bfloat16 under a scale over 2**8): then factor goes in first
    if factor * torch.finfo(scale.dtype).max > largest and scale.max().item() * factor > largest:
        out.mul_(factor)  # exact: a power of two
        factor = 1.0
    scale = scale.to(out.dtype) if factor == 1.0 else scale.to(out.dtype) * factor
    groups = _groups(out, group).mul_(scale[..., None])
    if lo is not None:
        groups.add_(lo.to(out.dtype)[..., None])
    return out


def quantize_affine(x: torch.Tensor, group: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric: q = round((x - min) / scale) in [0, 2**bits - 1]. Returns uint8 codes (one per element),
    scale and min, both [..., d // group]."""
    g = _groups(x.float(), group)
    lo = g.amin(-1).to(SCALE_DTYPE)
    levels = 2**bits - 1
    scale = ((g.amax(-1) - lo.float()) / levels).to(SCALE_DTYPE).clamp_min(_TINY)
    q = ((g - lo.float()[..., None]) / scale.float()[..., None]).round_().clamp_(0, levels)
    return q.to(torch.uint8).flatten(-2), scale, lo


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last axis: channel c in the low nibble, channel c + d/2 in the high one, so
    that each half of the channels unpacks as one run (interleaved pairs unpack at half the speed on CPU)."""
    half = q.shape[-1] // 2
    return q[..., :half] | (q[..., half:] << 4)


def unpack_nibbles(packed: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The codes `pack_nibbles` packed, [..., 2 * bytes]: as uint8, or widened into `out` (any dtype and strides)."""
    half = packed.shape[-1]
    if out is None:
        out = packed.new_empty(*packed.shape[:-1], 2 * half)
    # the halves as one view's two rows: compiled (the static step), two slices of `out` ran ~5x slower (CPU inductor)
    halves = out.unflatten(-1, (2, half))
    halves[..., 0, :].copy_(packed & 0xF)
    halves[..., 1, :].copy_(packed >> 4)
    return out
