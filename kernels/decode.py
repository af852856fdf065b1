"""Decode attention over encoded KV: a step's few queries attend over [encoded history | model-dtype tail] without
materialising the decoded history.

The torch path (`encoded_attention`, any codec) decodes the history a chunk at a time into one reused buffer, in two
passes: scores over every key, one softmax, then the values; so the step holds one chunk, not the history. It is the
reference the Triton kernel is tested against. The Triton kernel (triton_decode.py) splits the tokens instead and
returns a partial output normalised over each split with its log-sum-exp, which `merge_partials` combines exactly
with the tail's (flash-decoding, arXiv:2311.01282).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the codecs import these kernels
    from ..codecs import Codec

Packed = dict[str, torch.Tensor]
CHUNK = 1024  # tokens decoded at a time on the torch path: a few hundred KiB per head group, cache-resident


def codec_code(codec: Codec) -> int | None:
    """The Triton kernel's constant for a codec's layout, None for a codec it does not read."""
    if codec.name == "int8":
        return 0
    if codec.name == "fp8":
        return {"e4m3": 1, "e5m2": 2}[codec.format]
    if codec.name == "int4":
        return 3
    return None


def supports(codec: Codec, head_dim: int) -> bool:
    """Whether the Triton kernel reads this codec at this head_dim (and triton is installed)."""
    return (codec_code(codec) is not None and head_dim >= 16 and head_dim & (head_dim - 1) == 0
            and importlib.util.find_spec("triton") is not None)


def query_rows(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[b, hq, q, d] -> [b, h, g*q, d]: the queries of the g query heads sharing a KV head, as rows."""
    b, hq, q, d = query.shape
    return query.reshape(b, kv_heads, hq // kv_heads * q, d)


def partial_attention(rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
                      scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
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


def encoded_attention(rows: torch.Tensor, codec: Codec, k_packed: Packed, v_packed: Packed, valid: torch.Tensor,
                      tail_k: torch.Tensor, tail_v: torch.Tensor, tail_visible: torch.Tensor, scaling: float,
                      chunk: int = CHUNK) -> torch.Tensor:
    """The torch path: attention of rows [b, h, r, d] over the encoded tokens (valid [b, h or 1, n]) and the tail
    (visible [b, h or 1, r, t]), the history decoded `chunk` tokens at a time into one reused buffer. Two passes
    (scores over every key, one softmax, then values), so the few rows' scores are the only thing held per token.
    Returns [b, h, r, d] float32."""
    b, h, r, d = rows.shape
    n, t = next(iter(k_packed.values())).shape[2], tail_k.shape[2]
    rows = rows.float()
    scores = rows.new_empty(b, h, r, n + t)
    buffer = rows.new_empty(b, h, min(chunk, n), d)
    pieces = [slice(start, min(start + chunk, n)) for start in range(0, n, chunk)]
    for piece in pieces:
        keys = codec.decode({name: x[:, :, piece] for name, x in k_packed.items()}, buffer[:, :, : piece.stop - piece.start])
        torch.matmul(rows, keys.transpose(-1, -2), out=scores[..., piece])
    torch.matmul(rows, tail_k.float().transpose(-1, -2), out=scores[..., n:])
    scores.mul_(scaling)
    scores[..., :n].masked_fill_(~valid[:, :, None], float("-inf"))
    scores[..., n:].masked_fill_(~tail_visible, float("-inf"))
    probs = scores.softmax(-1).nan_to_num_(0.0)  # a row that sees nothing (a pad query) attends to nothing
    out = probs[..., n:] @ tail_v.float()
    for piece in pieces:
        values = codec.decode({name: x[:, :, piece] for name, x in v_packed.items()}, buffer[:, :, : piece.stop - piece.start])
        out += probs[..., piece] @ values
    return out


def attend_encoded(query: torch.Tensor, codec: Codec, k_packed: Packed, v_packed: Packed, valid: torch.Tensor,
                   tail_k: torch.Tensor, tail_v: torch.Tensor, tail_visible: torch.Tensor, scaling: float,
                   backend: str = "auto", chunk: int = CHUNK) -> torch.Tensor:
    """Attention of query [b, hq, q, d] over encoded tokens (packed by `codec`, [b, h, n, m] each; valid [b, h or 1,
    n] bool) followed by model-dtype tail tokens tail_k/v [b, h, t, d] (visible [b, h or 1, q, t] bool: the step's
    causal and padding mask). Returns [b, q, hq, d] in the query's dtype.

    backend: "triton" (CUDA, int8/fp8/int4; or any device under TRITON_INTERPRET=1), "torch" (chunked, any codec),
    "auto" (triton where it applies, else torch)."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be one of auto, torch, triton, got {backend!r}")
    b, hq, q, d = query.shape
    h = tail_k.shape[1]
    rows = query_rows(query, h)
    if backend == "auto":
        backend = "triton" if query.is_cuda and supports(codec, d) else "torch"
    visible = tail_visible.expand(b, h, q, -1)[:, :, None].expand(b, h, hq // h, q, -1).reshape(b, h, -1, tail_k.shape[2])
    if backend == "triton":
        from .triton_decode import encoded_partials_triton

        outs, lses = encoded_partials_triton(rows, codec, k_packed, v_packed, valid, scaling)
        out, lse = partial_attention(rows, tail_k, tail_v, visible, scaling)
        out = merge_partials([*outs, out], [*lses, lse])
    else:
        out = encoded_attention(rows, codec, k_packed, v_packed, valid, tail_k, tail_v, visible, scaling, chunk)
    return out.view(b, hq, q, d).transpose(1, 2).to(query.dtype).contiguous()
