"""The attention seam: an attention function registered with transformers that hands a kvcompress layer the step's
queries, so the layer can attend over what it stores and give its retention the attention it needs (no extra pass).

`route(model)` switches the model to `kvcompress_<its attention>`: when the keys a call receives are the ones a
kvcompress layer just returned from `update`, the layer runs the step (`KVLayer.attend`); every other call goes to
the model's own attention with the model's own mask, so a model routed once behaves as before with any other cache.
"""

from __future__ import annotations

import sys
import threading

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "kvcompress_"
_pending = threading.local()  # (layer, keys) of the last seam-managed update in this thread; its attention is next


def hand_over(layer, keys: torch.Tensor) -> None:
    """Called by a seam-managed layer's `update`: the next attention call with these keys is the layer's."""
    previous = getattr(_pending, "layer", None)
    if previous is not None and previous._stash is not None:
        previous._stash = None
        raise RuntimeError(
            f"a kvcompress {previous.retention.name} layer's update was not followed by its attention: the model's "
            "attention is not routed through the kvcompress seam (make_cache(model, ...) routes it; a model whose "
            "attention implementation was changed afterwards must be routed again)"
        )
    _pending.layer, _pending.keys = layer, keys


def _take_pending(keys: torch.Tensor):
    layer = getattr(_pending, "layer", None)
    if layer is None or _pending.keys is not keys:
        return None
    _pending.layer = _pending.keys = None
    return layer


def _own_attention(name: str, module):
    if name != "eager":
        return ALL_ATTENTION_FUNCTIONS[name]
    return sys.modules[type(module).__module__].eager_attention_forward  # each modeling file has its own eager


def _register(base: str) -> str:
    name = PREFIX + base
    if name in ALL_ATTENTION_FUNCTIONS.valid_keys():
        return name

    def seam_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = _take_pending(key)
        if layer is None:
            own = _own_attention(base, module)
            return own(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if dropout and module.training:
            raise ValueError("kvcompress caches are for inference: dropout must be 0 (call model.eval())")
        window = kwargs.get("sliding_window")
        if window is not None and layer.seen + query.shape[2] > window:
            raise ValueError(
                f"this layer attends over a sliding window of {window} tokens, which the kvcompress seam "
                "does not apply: use a model config with sliding_window=None, or a positional retention"
            )
        scaling = module.scaling if scaling is None else scaling
        return layer.attend(query, attention_mask, scaling, kwargs), None

    AttentionInterface.register(name, seam_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS.get(base, eager_mask))
    return name


GROUPED = PREFIX + "grouped_sdpa"


def grouped_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """sdpa where a mask is given and KV heads are shared (GQA): the query heads of a KV head attend as rows of that
    head, so K/V are never repeated per query head (transformers' sdpa repeats them whenever there is a mask, which a
    static cache always passes: that copied the whole room, times the group, at every step). Else the model's sdpa."""
    own = ALL_ATTENTION_FUNCTIONS["sdpa"]
    b, hq, q, d = query.shape
    h = key.shape[1]
    if (
        attention_mask is None
        or attention_mask.dtype != torch.bool
        or h == hq
        or dropout
        or kwargs.get("softcap") is not None
        or kwargs.get("sliding_window") is not None
    ):
        return own(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    mask = attention_mask[:, :, -q:, : key.shape[2]].expand(b, 1, q, -1)
    out, _ = _as_rows(query, key, value, mask, module.scaling if scaling is None else scaling)
    return out.transpose(1, 2).contiguous(), None


def route_grouped(model) -> None:
    """Let a model computing attention with sdpa attend over shared KV heads without repeating them (`grouped_sdpa`);
    other attention implementations are left as they are."""
    if getattr(getattr(model, "config", None), "_attn_implementation", None) != "sdpa":
        return
    if GROUPED not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(GROUPED, grouped_sdpa)
        AttentionMaskInterface.register(GROUPED, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(GROUPED)


def route(model) -> None:
    """Route the model's attention through the seam (idempotent). Raises ValueError for a model whose attention does
    not go through transformers' AttentionInterface."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current is None or not hasattr(model, "set_attn_implementation"):
        raise ValueError(
            f"this retention needs the model's attention routed through the kvcompress seam, but "
            f"{type(model).__name__} is not a transformers model with an attention implementation "
            "(pass the model to make_cache, not its config)"
        )
    if current == GROUPED:  # routed for a static step before: the seam wraps the sdpa it stands for
        current = "sdpa"
    elif current.startswith(PREFIX):
        return
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(model).__name__} does not dispatch attention through transformers' "
            "AttentionInterface, so score-based retention cannot see its attention"
        )
    model.set_attn_implementation(_register(current))


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows as generate numbers them: from 0 at each row's first real token (padding 1)."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


def new_token_valid(attention_mask, batch: int, q: int, device) -> torch.Tensor:
    """[batch, q] bool: which of the step's tokens are real (not padding), read from the model's own mask (the last q
    columns are the step's tokens whatever the layer stores): bool masks say True, additive ones 0."""
    return mask_visible(attention_mask, batch, q, q, device)[:, 0].diagonal(dim1=-2, dim2=-1)


def mask_visible(attention_mask, batch: int, q: int, kv: int, device) -> torch.Tensor:
    """[batch, 1, q, kv] bool: which of the last kv keys each of the step's q queries sees, from the model's own mask
    (bool: True; additive: 0), or causal where the model passed none (sdpa's is_causal path)."""
    if not isinstance(attention_mask, torch.Tensor):
        causal = torch.ones(q, kv, dtype=torch.bool, device=device).tril(kv - q)
        return causal.expand(batch, 1, q, kv)
    block = attention_mask[:, :1, -q:, -kv:]
    visible = block if block.dtype == torch.bool else block == 0
    return visible.expand(batch, 1, q, kv).to(device)


WEIGHT_ROWS = 128  # queries whose weights are held at once where every query's are read (mass, softcap)


def grouped_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    visible: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    rows: int = 0,
    per_key: str | None = None,
):
    """Attention of query [b, hq, q, d] over keys/values [b, h, s, d] (h KV heads shared by hq/h query heads each),
    visible [b, h, q, s] bool, [b, 1, q, s] where every KV head sees the same keys, or None: causal over the step
    alone (s == q). Returns the output [b, q, hq, d]; the float32 attention weights of the last `rows` queries
    [b, h, hq/h, rows, s] (or None); per key [b, h, s], with per_key="mass" the attention it received from every
    query, the mean over the query heads of its KV head, with "peak" the most any query of those heads gave it (else
    None); and the bytes it allocated beside its inputs and outputs (masks and K/V repeated per query head, the
    weights of a block of queries).

    A prompt's weights are prompt x prompt per query head (4 GiB per head at 32k tokens): the output comes from torch's
    fused sdpa, and where every query's weights are read (per key; softcap, which sdpa lacks) they are computed
    WEIGHT_ROWS queries at a time, and make the output too where a mask applies. The causal masks of the weights'
    blocks (1/(4 * hq) of them) are not counted."""
    b, hq, q, d = query.shape
    h, s = keys.shape[1], keys.shape[2]
    if visible is None and s != q:
        raise ValueError(f"a causal step attends over its own {q} tokens, got {s} keys (pass the mask)")
    scratch, out, total = 0, None, None
    if per_key not in (None, "mass", "peak"):
        raise ValueError(f"per_key must be None, 'mass' or 'peak', got {per_key!r}")
    if softcap is not None or per_key:
        # under a mask the output comes from these weights too: on CPU a second pass of torch's masked attention
        # costs more than this product (kvzip's reconstruction, every step of which is masked)
        made_here = softcap is not None or visible is not None
        out = query.new_empty(b, hq, q, d) if made_here else None
        total = keys.new_zeros(b, h, s, dtype=torch.float32) if per_key else None
        keys_f, values_f = keys.float(), values.float()
        buffer = keys.new_empty(b * hq * min(WEIGHT_ROWS, q) * s, dtype=torch.float32)  # every block's weights
        for start in range(0, q, WEIGHT_ROWS):
            stop = min(start + WEIGHT_ROWS, q)
            seen = _rows_visible(visible, q, s, start, stop, keys.device)
            reach = _reach(seen, s - q + stop)
            block = _weights(query[:, :, start:stop], keys_f[:, :, :reach], seen[..., :reach], scaling, softcap, buffer)
            if out is not None:
                made = block.flatten(2, 3) @ values_f[:, :, :reach]  # [b, h, g x rows, d]
                out.view(b, h, hq // h, q, d)[:, :, :, start:stop] = made.view(block.shape[:4] + (d,))
            if per_key == "mass":
                total[..., :reach] += block.sum(dim=(2, 3)) / (hq // h)
            elif per_key == "peak":
                total[..., :reach] = torch.maximum(total[..., :reach], block.amax(dim=(2, 3)))
        scratch = buffer.nbytes + (total.nbytes if total is not None else 0)
    if out is None:
        out, copied = _fused(query, keys, values, visible, scaling)
        scratch += copied
    out = out.transpose(1, 2).contiguous()
    if not rows:
        return out, None, total, scratch
    rows = min(rows, q)
    last = _weights(query[:, :, -rows:], keys, _rows_visible(visible, q, s, q - rows, q, keys.device), scaling, softcap)
    return out, last, total, scratch


def _fused(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor | None, scaling: float
) -> tuple[torch.Tensor, int]:
    """torch's fused attention [b, hq, q, d] over shared KV heads, copying as little as it can, and the bytes it
    copied. Causal, or on CPU under one mask for all heads: sdpa's own GQA, nothing copied. Under a mask per KV head
    (heads that keep different tokens), or on CUDA (whose fused kernels take GQA unmasked only) where it is smaller:
    the g query heads of a KV head attend as g x q rows of it, under the mask repeated g times (g x q x s bytes per
    mask head: a decode step's is tiny). Else (a long prompt on CUDA under one mask): K/V repeated per query head, as
    transformers' sdpa does, rather than a prompt x prompt mask per query head (1 GiB per head at 32k tokens)."""
    b, hq, q, d = query.shape
    h = keys.shape[1]
    group = hq // h
    if group == 1 or visible is None or (visible.shape[1] == 1 and query.device.type == "cpu"):
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=visible, is_causal=visible is None, scale=scaling, enable_gqa=group > 1
        )
        return out, 0
    if visible.shape[1] > 1 or _rows_are_smaller(q, h, d, keys.element_size()):
        out, mask = _as_rows(query, keys, values, visible, scaling)
        return out, mask.nbytes
    k, v = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(query, k, v, attn_mask=visible, scale=scaling), k.nbytes + v.nbytes


def _as_rows(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """sdpa with the g query heads of each KV head attending as g x q rows of it (query head i shares KV head
    i // g), under `mask` [b, 1 or h, q, s] repeated g times: K/V are never repeated. Returns the output
    [b, hq, q, d] and the repeated mask (what it copied)."""
    b, hq, q, d = query.shape
    h, s = keys.shape[1], keys.shape[2]
    group, heads = hq // h, mask.shape[1]
    rows_mask = mask[:, :, None].expand(b, heads, group, q, s).reshape(b, heads, group * q, s)
    out = F.scaled_dot_product_attention(
        query.reshape(b, h, group * q, d), keys, values, attn_mask=rows_mask, scale=scaling
    )
    return out.view(b, hq, q, d), rows_mask


def _rows_are_smaller(q: int, kv_heads: int, head_dim: int, itemsize: int) -> bool:
    """Whether one mask repeated per query head of a group (q x s bytes each) is smaller than K/V repeated per query
    head (2 x s x kv_heads x head_dim x itemsize bytes each): under one mask on CUDA, which _fused copies."""
    return q < 2 * kv_heads * head_dim * itemsize


def prompt_step_bytes(
    keys: torch.Tensor, query_heads: int, rows: int, padded: bool, compute: torch.dtype, mass: bool = False
) -> int:
    """The analytic twin of what a seam layer's prompt step into an empty layer allocates beside the storage, for
    keys [b, h, n, d] as stored: K/V in the compute dtype, the float32 weights of the last `rows` queries, with `mass`
    a block of WEIGHT_ROWS queries' weights and the sums, and with padding the step's mask [b, 1, n, n] (plus, on
    CUDA, what _fused copies). A replayed prefill counts it."""
    b, h, n, d = keys.shape
    kv, group = 2 * keys.numel() * compute.itemsize, query_heads // h
    repeated = 0  # _fused's copies: on CUDA, a padded prompt's mask per query head of a KV head, or K/V per query head
    if padded and group > 1 and keys.device.type != "cpu":
        repeated = b * group * n * n if _rows_are_smaller(n, h, d, compute.itemsize) else kv * group
    summed = b * query_heads * min(WEIGHT_ROWS, n) * n * 4 + b * h * n * 4 if mass else 0
    return kv + b * query_heads * min(rows, n) * n * 4 + summed + (b * n * n if padded else 0) + repeated


def _rows_visible(visible: torch.Tensor | None, q: int, s: int, start: int, stop: int, device) -> torch.Tensor:
    """What queries start..stop of the step see: rows of `visible`, or of the causal mask ([stop - start, s])."""
    if visible is not None:
        return visible[:, :, start:stop]
    return torch.ones(stop - start, s, dtype=torch.bool, device=device).tril(s - q + start)


def _reach(seen: torch.Tensor, causal_reach: int) -> int:
    """How many leading keys a block of queries can see: `causal_reach` where none of them sees a key past it (a
    causal step's rows start..stop see at most s - q + stop keys), else all of them."""
    if causal_reach >= seen.shape[-1] or bool(seen[..., causal_reach:].any()):
        return seen.shape[-1]
    return causal_reach


def _weights(
    query: torch.Tensor,
    keys: torch.Tensor,
    visible: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    buffer: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 softmax weights [b, h, hq/h, q, s] of query [b, hq, q, d] over keys [b, h, s, d], written into the
    front of `buffer` (float32, at least that many elements) where given. The query heads of a KV head are rows of one
    product with it (K never repeated), the mask touches only the columns some query does not see (a causal step's
    own tokens) and the softmax runs in place: nothing is allocated per block and the scores take few passes."""
    b, hq, q, d = query.shape
    h, s = keys.shape[1], keys.shape[2]
    group = hq // h
    rows, keys_t = query.float().reshape(b * h, group * q, d), keys.float().flatten(0, 1).transpose(1, 2)
    hidden = ~(visible if visible.dim() == 4 else visible.expand(b, 1, q, s))  # [q, s]: the same for every row
    alpha = scaling if softcap is None else scaling / softcap
    if torch.is_grad_enabled() and (query.requires_grad or keys.requires_grad):  # autograd: no out= nor in place
        scores = torch.bmm(rows, keys_t) * alpha
        scores = scores.tanh() * softcap if softcap is not None else scores
        scores = scores.view(b, h, group, q, s).masked_fill(hidden[:, :, None], float("-inf"))
        return scores.softmax(-1).nan_to_num(0.0)
    size = b * hq * q * s
    scores = (buffer[:size] if buffer is not None else keys.new_empty(size, dtype=torch.float32)).view(b * h, -1, s)
    torch.baddbmm(scores, rows, keys_t, beta=0, alpha=alpha, out=scores)
    if softcap is not None:
        scores.tanh_().mul_(softcap)
    # a block of queries masks few columns (a causal step's own tokens): find the first (a sync, so not per decode step)
    first = 0 if q == 1 else int(torch.cat([hidden.any(dim=(0, 1, 2)), hidden.new_ones(1)]).nonzero()[0])
    scores.view(b, h, group, q, s)[..., first:].masked_fill_(hidden[:, :, None, :, first:], float("-inf"))
    torch.softmax(scores, -1, out=scores)
    if q == 1 or bool(hidden.all(dim=-1).any()):  # a query that sees nothing (a pad query under the model's mask)
        scores.nan_to_num_(0.0)  # attends to nothing
    return scores.view(b, h, group, q, s)
