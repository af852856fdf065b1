"""Group-wise quantization of KV tensors [batch, heads, tokens, head_dim], and `CodeLayout`: how a codec lays out
its codes and scales, which the fused decode paths read instead of asking which codec wrote them.

Token groups run along head_dim, so every token is encoded on its own: appending a token never touches the history.
Channel groups (KIVI's keys) run along the tokens: one scale per channel per `group` tokens, spread over the group's
tokens so that the scales are stored [batch, heads, tokens, width] like every other encoded tensor.
Scales are float16: 2 bytes per group, rounded before quantizing so encode and decode use the same value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.float16
_TINY = torch.finfo(SCALE_DTYPE).tiny  # smallest normal float16: keeps all-zero groups from dividing by zero


CODES = ("int", "affine", "e4m3", "e5m2")  # signed codes x scale; unsigned codes x scale + min; float8 codes x scale
SCALES = ("token", "channel")


@dataclass(frozen=True)
class CodeLayout:
    """How one side's (K's or V's) encoded tensors are laid out, as a fused decode path reads them.

    q [b, h, n, d * bits / 8]: one code per channel; codes under 8 bits packed along channels (`pack_codes`).
    code: "int" (signed, decoded q * scale), "affine" (unsigned, q * scale + min), "e4m3" / "e5m2" (float8, q * scale).
    scale: "token": tensors "scale" (and "min", affine) [b, h, n, d / group], one per `group` channels of a token;
    "channel": tensors "channel_scale" (and "channel_min") [b, h, n, ceil(d / group)], one per channel per `group`
    tokens (whole groups only), spread over the group's tokens (`spread_channels`)."""

    code: str
    bits: int
    scale: str
    group: int

    def __post_init__(self):
        if self.code not in CODES or self.scale not in SCALES or self.bits not in (2, 4, 8) or self.group < 1:
            raise ValueError(
                f"CodeLayout: code must be one of {', '.join(CODES)}, bits 2, 4 or 8, scale one of "
                f"{', '.join(SCALES)}, group >= 1; got {self}"
            )

    @property
    def names(self) -> tuple[str, str]:
        """The names of the scale and minimum tensors in a Packed dict."""
        return ("scale", "min") if self.scale == "token" else ("channel_scale", "channel_min")


def spread_channels(per_group: torch.Tensor, group: int) -> torch.Tensor:
    """[b, h, groups, d] values per channel per group of `group` tokens -> [b, h, groups * group, ceil(d / group)]:
    channel c of a group in its token c // width, slot c % width (zeros pad the last token's slots)."""
    width = math.ceil(per_group.shape[-1] / group)
    padded = torch.nn.functional.pad(per_group, (0, group * width - per_group.shape[-1]))
    return padded.unflatten(-1, (group, width)).flatten(2, 3)


def gather_channels(spread: torch.Tensor, group: int, channels: int) -> torch.Tensor:
    """The inverse of `spread_channels`: [b, h, groups * group, width] -> [b, h, groups, channels]."""
    return spread.unflatten(2, (-1, group)).flatten(-2)[..., :channels]


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


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """8 // bits codes of `bits` bits per byte along the last axis: the channels split into 8 // bits runs, run k in
    bits [k * bits, (k + 1) * bits) of each byte (4 bits: channel c in the low nibble, c + d/2 in the high one), so that
    each run unpacks as one slice (interleaved codes unpack at half the speed on CPU)."""
    runs = 8 // bits
    width = q.shape[-1] // runs
    packed = q[..., :width]
    for run in range(1, runs):
        packed = packed | (q[..., run * width : (run + 1) * width] << (run * bits))
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The codes `pack_codes` packed, [..., 8 // bits * bytes]: as uint8, or widened into `out` (any dtype and
    strides)."""
    runs, width = 8 // bits, packed.shape[-1]
    if out is None:
        out = packed.new_empty(*packed.shape[:-1], runs * width)
    # the runs as one view's rows: compiled (the static step), slices of `out` ran ~5x slower (CPU inductor)
    rows = out.unflatten(-1, (runs, width))
    for run in range(runs):
        shifted = packed >> (run * bits) if run else packed
        rows[..., run, :].copy_(shifted if run == runs - 1 else shifted & (1 << bits) - 1)
    return out


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte (`pack_codes`)."""
    return pack_codes(q, 4)


def unpack_nibbles(packed: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The codes `pack_nibbles` packed (`unpack_codes`)."""
    return unpack_codes(packed, 4, out)
