"""Triton flash-decoding over encoded KV: the codes and scales of any codec that declares its `CodeLayout` (signed,
affine or float8 codes of 8, 4 or 2 bits; scales per group of a token's channels or per channel over a group of
tokens), read and dequantised in registers, never written back as a decoded history.

One program per (row, KV head, token split) attends the g*q query rows of that KV head over its split of the encoded
tokens (online softmax, blocks of BLOCK_N tokens) and writes a partial output with its log-sum-exp; decode.py merges
the splits with the model-dtype tail. Splits keep every SM busy when batch x heads is small and contexts are long.
Runs on CUDA, or on CPU tensors when TRITON_INTERPRET=1 is set before triton is imported (how CI tests it against
the torch path). decode.py imports this module where triton is installed: triton is optional on CPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .quant import CODES, CodeLayout

BLOCK_N = 64  # tokens per inner block
MIN_ROWS = 16  # tl.dot needs at least 16 rows
TARGET_PROGRAMS = 264  # two waves of an H100/H200's 132 SMs


@triton.jit
def dequantize(
    codes,
    scales,
    mins,
    n,
    d,
    inside,
    code_stride,
    scale_stride,
    D: tl.constexpr,
    CODE: tl.constexpr,
    BITS: tl.constexpr,
    CHANNEL: tl.constexpr,
    GROUP: tl.constexpr,
):
    """Tokens n [BLOCK] x channels d [D] of one side, decoded to float32 by its layout (CODE: an index of CODES)."""
    if BITS == 8:
        raw = tl.load(codes + n[:, None] * code_stride + d[None, :], mask=inside[:, None], other=0)
        if CODE == 2:
            x = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        elif CODE == 3:
            x = raw.to(tl.float8e5, bitcast=True).to(tl.float32)
        else:
            x = raw.to(tl.float32)
    else:  # 8 // BITS codes a byte: channel c in byte c % WIDTH, bits from (c // WIDTH) * BITS (pack_codes)
        byte = tl.load(codes + n[:, None] * code_stride + (d % (D * BITS // 8))[None, :], mask=inside[:, None], other=0)
        x = ((byte.to(tl.int32) >> ((d // (D * BITS // 8)) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
    if CHANNEL:  # channel c of token n's group: in the group's token c // slots, slot c % slots (spread_channels)
        slots = (D + GROUP - 1) // GROUP
        at = ((n // GROUP) * GROUP)[:, None] * scale_stride + ((d // slots) * scale_stride + d % slots)[None, :]
    else:
        at = n[:, None] * scale_stride + (d // GROUP)[None, :]
    x = x * tl.load(scales + at, mask=inside[:, None], other=0).to(tl.float32)
    if CODE == 1:
        x = x + tl.load(mins + at, mask=inside[:, None], other=0).to(tl.float32)
    return x


@triton.jit
def decode_split(
    Q,
    KQ,
    KS,
    KM,
    VQ,
    VS,
    VM,
    VALID,
    OUT,
    LSE,
    q_b,
    q_h,
    q_r,
    kq_b,
    kq_h,
    kq_n,
    ks_b,
    ks_h,
    ks_n,
    vq_b,
    vq_h,
    vq_n,
    vs_b,
    vs_h,
    vs_n,
    valid_b,
    valid_h,
    o_b,
    o_h,
    o_s,
    o_r,
    l_b,
    l_h,
    l_s,
    heads,
    tokens,
    rows,
    per_split,
    scaling,
    R: tl.constexpr,
    D: tl.constexpr,
    K_CODE: tl.constexpr,
    K_BITS: tl.constexpr,
    K_CHANNEL: tl.constexpr,
    K_GROUP: tl.constexpr,
    V_CODE: tl.constexpr,
    V_BITS: tl.constexpr,
    V_CHANNEL: tl.constexpr,
    V_GROUP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = bh // heads, bh % heads
    r, d = tl.arange(0, R), tl.arange(0, D)
    q = tl.load(Q + b * q_b + h * q_h + r[:, None] * q_r + d[None, :], mask=r[:, None] < rows, other=0.0)
    m = tl.full([R], float("-inf"), tl.float32)
    total = tl.zeros([R], tl.float32)
    acc = tl.zeros([R, D], tl.float32)
    start = split * per_split
    end = tl.minimum(start + per_split, tokens)
    offset = 0
    while offset < per_split:  # not a for loop: Triton 3.6's interpreter cannot index range() under numpy 2.4
        n = start + offset + tl.arange(0, BLOCK)
        offset += BLOCK
        inside = n < end
        ok = tl.load(VALID + b * valid_b + h * valid_h + n, mask=inside, other=0) != 0
        k = dequantize(
            KQ + b * kq_b + h * kq_h,
            KS + b * ks_b + h * ks_h,
            KM + b * ks_b + h * ks_h,
            n,
            d,
            inside,
            kq_n,
            ks_n,
            D,
            K_CODE,
            K_BITS,
            K_CHANNEL,
            K_GROUP,
        )
        s = tl.dot(q, tl.trans(k.to(q.dtype))) * scaling
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet stays at zero
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        v = dequantize(
            VQ + b * vq_b + h * vq_h,
            VS + b * vs_b + h * vs_h,
            VM + b * vs_b + h * vs_h,
            n,
            d,
            inside,
            vq_n,
            vs_n,
            D,
            V_CODE,
            V_BITS,
            V_CHANNEL,
            V_GROUP,
        )
        total = total * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m = m_new
    seen = total > 0
    out = acc / tl.where(seen, total, 1.0)[:, None]
    lse = tl.where(seen, m + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    tl.store(OUT + b * o_b + h * o_h + split * o_s + r[:, None] * o_r + d[None, :], out, mask=r[:, None] < rows)
    tl.store(LSE + b * l_b + h * l_h + split * l_s + r, lse, mask=r < rows)


def encoded_partials_triton(
    rows: torch.Tensor,
    k_layout: CodeLayout,
    v_layout: CodeLayout,
    k_packed: dict[str, torch.Tensor],
    v_packed: dict[str, torch.Tensor],
    valid: torch.Tensor,
    scaling: float,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Partials (outputs [b, h, r, d] float32, log-sum-exps [b, h, r]) of rows [b, h, r, d] over the encoded tokens,
    one per token split; valid [b, h or 1, n] bool. K and V are read by their layouts (`Codec.layout`)."""
    b, h, n_rows, d = rows.shape
    tokens = k_packed["q"].shape[2]

    def tensors(packed, layout):
        """Codes (float8 as bytes), scales, and minimums (the scales where the codes have none)."""
        q, (scale_name, min_name) = packed["q"], layout.names
        return q.view(torch.uint8) if q.dtype.is_floating_point else q, packed[scale_name], packed.get(min_name)

    (kq, ks, km), (vq, vs, vm) = tensors(k_packed, k_layout), tensors(v_packed, v_layout)
    km, vm = ks if km is None else km, vs if vm is None else vm
    if any(t.stride(-1) != 1 for t in (kq, vq, ks, vs)) or km.stride() != ks.stride() or vm.stride() != vs.stride():
        raise ValueError("encoded KV must be contiguous along channels, with min laid out like scale")
    rows = rows.contiguous()
    flags = valid.to(torch.int8).contiguous()
    splits = max(1, min(math.ceil(tokens / BLOCK_N), math.ceil(TARGET_PROGRAMS / (b * h))))
    per_split = math.ceil(math.ceil(tokens / splits) / BLOCK_N) * BLOCK_N
    splits = math.ceil(tokens / per_split) if tokens else 1
    width = max(MIN_ROWS, 1 << (n_rows - 1).bit_length())
    out = rows.new_empty(b, h, splits, n_rows, d, dtype=torch.float32)
    lse = rows.new_empty(b, h, splits, n_rows, dtype=torch.float32)
    decode_split[(b * h, splits)](
        rows,
        kq,
        ks,
        km,
        vq,
        vs,
        vm,
        flags,
        out,
        lse,
        rows.stride(0),
        rows.stride(1),
        rows.stride(2),
        kq.stride(0),
        kq.stride(1),
        kq.stride(2),
        ks.stride(0),
        ks.stride(1),
        ks.stride(2),
        vq.stride(0),
        vq.stride(1),
        vq.stride(2),
        vs.stride(0),
        vs.stride(1),
        vs.stride(2),
        flags.stride(0),
        flags.stride(1) if flags.shape[1] > 1 else 0,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        out.stride(3),
        lse.stride(0),
        lse.stride(1),
        lse.stride(2),
        h,
        tokens,
        n_rows,
        per_split,
        scaling,
        R=width,
        D=d,
        K_CODE=CODES.index(k_layout.code),
        K_BITS=k_layout.bits,
        K_CHANNEL=k_layout.scale == "channel",
        K_GROUP=k_layout.group,
        V_CODE=CODES.index(v_layout.code),
        V_BITS=v_layout.bits,
        V_CHANNEL=v_layout.scale == "channel",
        V_GROUP=v_layout.group,
        BLOCK=BLOCK_N,
    )
    return list(out.unbind(2)), list(lse.unbind(2))
