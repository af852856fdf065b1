"""Decode attention over encoded KV: a step's few queries attend over [encoded history | model-dtype tail] without
materialising the decoded history.

The torch path (`encoded_attention`, any codec) decodes the history a chunk at a time into one reused buffer, in two
passes: scores over every key, one softmax, then the values; so the step holds one chunk, not the history. It is the
reference the Triton kernel is tested against. The Triton kernel (triton_decode.py) splits the tokens instead and
returns a partial output normalised over each split with its log-sum-exp, which `merge_partials` combines exactly
with the tail's (flash-decoding, arXiv:2311.01282).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

try:  # triton is optional (CPU installs lack it): without it the torch path serves every codec
    from .triton_decode import encoded_partials_triton
except ModuleNotFoundError as missing:
    if missing.name != "triton":
        raise
    encoded_partials_triton = None

if TYPE_CHECKING:  # the codecs import these kernels
    from ..codecs import Codec

Packed = dict[str, torch.Tensor]
NEGLIGIBLE = 2.0**-100  # attention weights below this are dropped on the torch path
CHUNK_BYTES = 16 << 20  # the most decoded history (float32) the torch path holds at once, K or V


def chunk_tokens(batch: int, heads: int, head_dim: int) -> int:
    """Tokens the torch path decodes at a time: within CHUNK_BYTES, in multiples of 256. A few chunks of 1,024 tokens
    cost more in per-op overhead and strided writes (CPU) than one chunk of the history saves in cache misses."""
    return max(256, CHUNK_BYTES // (batch * heads * head_dim * 4) // 256 * 256)


def supports(codec: Codec, head_dim: int) -> bool:
    """Whether the Triton kernel reads this codec at this head_dim: the codec declares its code layout
    (`Codec.layout`), head_dim is a power of two >= 16, and triton is installed."""
    return (
        codec.layout(head_dim) is not None
        and head_dim >= 16
        and head_dim & (head_dim - 1) == 0
        and encoded_partials_triton is not None
    )


def auto_backend(query: torch.Tensor, codec: Codec) -> str:
    """The backend attend_encoded picks for "auto": the Triton kernel where it reads the codec on CUDA, else torch."""
    return "triton" if query.is_cuda and supports(codec, query.shape[-1]) else "torch"


def query_rows(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[b, hq, q, d] -> [b, h, g*q, d]: the queries of the g query heads sharing a KV head, as rows."""
    b, hq, q, d = query.shape
    return query.reshape(b, kv_heads, hq // kv_heads * q, d)


def partial_attention(
    rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of rows [b, h, r, d] over keys/values [b, h, s, d], visible [b, h or 1, r or 1, s] bool. Returns the
    output normalised over these keys [b, h, r, d] float32 and its log-sum-exp [b, h, r] (-inf where a row sees
    nothing: its output is 0 and it weighs nothing in the merge)."""
    scores = (rows.float() @ keys.float().transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = scores.logsumexp(-1)
    probs = (scores - lse[..., None]).exp().nan_to_num(0.0)
    return probs @ values.float(), lse


def merge_partials(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """Combine partial outputs [..., r, d] with their log-sum-exps [..., r] into the attention over all their keys."""
    lse = torch.stack(lses)
    weights = (lse - lse.logsumexp(0)).exp().nan_to_num(0.0)
    return (torch.stack(outs) * weights[..., None]).sum(0)


def encoded_attention(
    rows: torch.Tensor,
    codec: Codec,
    k_packed: Packed,
    v_packed: Packed,
    valid: torch.Tensor,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    tail_visible: torch.Tensor,
    scaling: float,
    chunk: int | None = None,
    buffer: torch.Tensor | None = None,
) -> torch.Tensor:
    """The torch path: attention of rows [b, h, r, d] over the encoded tokens (valid [b, h or 1, n]) and the tail
    (visible [b, h or 1, r, t]), the history decoded `chunk` tokens at a time (None: `chunk_tokens`) into one reused
    buffer (`buffer`, float32 [b, h, >= chunk, d]: memory the caller has already touched; None: a new one). Two
    passes (scores over every key, one softmax, then the values), so the few rows' scores are the only thing held per
    token. A codec with one scale per token (`decode_unscaled`) leaves its codes unscaled: the scales multiply the
    rows' scores and weights, r numbers a token instead of d. Returns [b, h, r, d] float32."""
    b, h, r, d = rows.shape
    n = next(iter(k_packed.values())).shape[2]
    rows = rows.float()
    block = codec.token_block  # a chunk decodes whole blocks of tokens (the codec encodes them together)
    chunk = -(-(chunk or chunk_tokens(b, h, d)) // block) * block
    if buffer is None or buffer.shape[2] < min(chunk, n):  # a block wider than the caller's chunk: room for it
        buffer = rows.new_empty(b, h, min(chunk, n), d)
    pieces = [slice(start, min(start + chunk, n)) for start in range(0, n, chunk)]

    def decoded(packed: Packed, piece: slice):
        """The piece's tokens in `buffer`, and their scales [b, h, 1, tokens] with a power of two still to apply (or
        None, 0: decoded in full)."""
        part = packed if len(pieces) == 1 else {name: x[:, :, piece] for name, x in packed.items()}
        out = buffer[:, :, : piece.stop - piece.start]
        unscaled = codec.decode_unscaled(part, out)
        if unscaled is None:
            return codec.decode(part, out), None, 0
        scale, exponent = unscaled
        return out, scale[:, :, None], exponent

    encoded = rows.new_empty(b, h, r, n)  # apart from the tail's: a matmul into strided columns costs half again
    for piece in pieces:
        keys, scale, exponent = decoded(k_packed, piece)
        lifted, exponent = _lift(rows, exponent)
        scores = encoded[..., piece]
        torch.matmul(lifted, keys.transpose(-1, -2), out=scores)
        scores.mul_(scaling if scale is None else scale.float().mul_(scaling * 2.0**exponent))
    encoded.masked_fill_(~valid[:, :, None], float("-inf"))
    tail = (rows @ tail_k.float().transpose(-1, -2)).mul_(scaling).masked_fill_(~tail_visible, float("-inf"))
    probs = torch.cat([encoded, tail], dim=-1).softmax(-1)
    # weights under 2**-100 weigh nothing a float32 sum keeps, and their products with small codes are subnormals,
    # which the CPU multiplies several times slower; a row that sees nothing (a pad query, NaN) attends to nothing
    probs = F.threshold_(probs, NEGLIGIBLE, 0.0).nan_to_num_(0.0)
    out = probs[..., n:] @ tail_v.float()
    for piece in pieces:
        values, scale, exponent = decoded(v_packed, piece)
        weights = probs[..., piece]
        if scale is not None:
            scale, exponent = _lift(scale.float(), exponent)
            weights = weights * scale  # a weight is at most 1: within range where its scale is
        out.view(b * h, r, d).baddbmm_(weights.reshape(b * h, r, -1), values.view(b * h, -1, d), alpha=2.0**exponent)
    return out


def _lift(x: torch.Tensor, exponent: int) -> tuple[torch.Tensor, int]:
    """x times as much of 2**exponent as keeps it within float32 (all of it unless x is over 2**(128 - exponent):
    then half), and the exponent left. Codes laid in float bits are worth code / 2**exponent (fp8: 2**-120): the
    products of the matmul they enter must be lifted back before it, or the small ones fall into subnormals, which
    the CPU multiplies many times slower."""
    if not exponent:
        return x, 0
    power = exponent if x.abs().max().item() < 2.0 ** (128 - exponent) else exponent // 2
    return x * 2.0**power, exponent - power


def attend_encoded(
    query: torch.Tensor,
    codec: Codec,
    k_packed: Packed,
    v_packed: Packed,
    valid: torch.Tensor,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    tail_visible: torch.Tensor,
    scaling: float,
    backend: str = "auto",
    chunk: int | None = None,
    buffer: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of query [b, hq, q, d] over encoded tokens (packed by `codec`, [b, h, n, m] each; valid [b, h or 1,
    n] bool) followed by model-dtype tail tokens tail_k/v [b, h, t, d] (visible [b, h or 1, q, t] bool: the step's
    causal and padding mask). Returns [b, q, hq, d] in the query's dtype.

    backend: "triton" (CUDA, a codec that declares its code layout: `supports`; or any device under
    TRITON_INTERPRET=1), "torch" (chunked, any codec), "auto" (triton where it applies, else torch)."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be one of auto, torch, triton, got {backend!r}")
    b, hq, q, d = query.shape
    h = tail_k.shape[1]
    rows = query_rows(query, h)
    if backend == "auto":
        backend = auto_backend(query, codec)
    visible = (
        tail_visible.expand(b, h, q, -1)[:, :, None].expand(b, h, hq // h, q, -1).reshape(b, h, -1, tail_k.shape[2])
    )
    if backend == "triton":
        if not supports(codec, d):
            raise ValueError(
                f"the triton decode kernel reads codecs that declare their code layout (Codec.layout) at a "
                f"power-of-two head_dim >= 16, and needs triton installed; got codec {codec.name!r}, head_dim {d}"
            )
        outs, lses = encoded_partials_triton(rows, *codec.layout(d), k_packed, v_packed, valid, scaling)
        out, lse = partial_attention(rows, tail_k, tail_v, visible, scaling)
        out = merge_partials([*outs, out], [*lses, lse])
    else:
        out = encoded_attention(rows, codec, k_packed, v_packed, valid, tail_k, tail_v, visible, scaling, chunk, buffer)
    return out.view(b, hq, q, d).transpose(1, 2).to(query.dtype).contiguous()
