"""The transformers glue: one cache layer composed of a retention, a codec and a tier; the container only routes.

A layer holds, per stored token, either its encoded form (`encoded_k/v`, older tokens) or its model-dtype form
(`recent_k/v`, the codec's full-precision residual; every token when the codec is lossless). Retention runs after
each update on the whole stored sequence, then the residual's overflow is encoded: only new tokens are ever
quantized. `update` returns decoded K/V for attention; a fused attention path can later take the encoded form
instead (DESIGN.md: AttentionInterface + AttentionMaskInterface).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from .codecs import Codec, Packed
from .retention import Retention
from .strategy import StrategySpec, parse_strategy
from .tiers import Tier

# A view that pins more than this fraction of dead bytes in its storage is copied out, so evicted tokens are freed
# now rather than at the next append (and so resident bytes equal what the layer holds).
_MAX_DEAD_FRACTION = 1 / 64


def _own(t: torch.Tensor) -> torch.Tensor:
    return t.clone() if t.untyped_storage().nbytes() - t.nbytes > t.nbytes * _MAX_DEAD_FRACTION else t


def _take(t: torch.Tensor, keep: slice | torch.Tensor, dim: int = 2) -> torch.Tensor:
    """Keep tokens along `dim` by a slice (same in every row) or per-row indices [batch, kept]."""
    if isinstance(keep, slice):
        return _own(t[(slice(None),) * dim + (keep,)])
    index = keep.view(keep.shape + (1,) * (t.dim() - 2)) if dim == 1 else keep[:, None, :, None]
    return t.gather(dim, index.expand(*t.shape[:dim], keep.shape[1], *t.shape[dim + 1 :]))


def _split_keep(keep: slice | torch.Tensor, n_encoded: int, stored: int):
    """Split a keep over [encoded | recent] storage into one keep per part, or None where rows differ in how many
    tokens they keep in a part (possible only on a multi-token step before the first eviction). A slice keeps
    [start, stop) with stop >= n_encoded."""
    if isinstance(keep, slice):
        start, stop = keep.start, keep.stop
        return slice(min(start, n_encoded), min(stop, n_encoded)), slice(max(start - n_encoded, 0), stop - n_encoded)
    in_encoded = (keep < n_encoded).sum(1)
    if (in_encoded != in_encoded[0]).any():
        return None
    cut = int(in_encoded[0])
    return keep[:, :cut], keep[:, cut:] - n_encoded


class KVLayer(CacheLayerMixin):
    """One decoder layer's KV under a (retention, codec, tier) strategy."""

    is_sliding = False  # the mask is the model's plain causal one, sized by get_mask_sizes
    is_compileable = False

    def __init__(self, retention: Retention, codec: Codec, tier: Tier):
        super().__init__()
        self.retention, self.codec, self.tier = retention, codec, tier
        self.seen = 0  # tokens seen (what positions and the query offset derive from), not tokens stored
        self.encoded_k: Packed = {}
        self.encoded_v: Packed = {}
        self.recent_k: torch.Tensor | None = None
        self.recent_v: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # [batch, stored] int32, only when the retention reads them

    @property
    def is_croppable(self) -> bool:
        return self.retention.budget is None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.codec.check(key_states.shape[-1], key_states.dtype)
        self.recent_k = self.tier.place(key_states[:, :, :0].clone())
        self.recent_v = self.tier.place(value_states[:, :, :0].clone())
        if self.retention.needs_positions:
            self.positions = torch.empty(key_states.shape[0], 0, dtype=torch.int32, device=self.device)
        self.is_initialized = True

    # -- sizes -------------------------------------------------------------------------------------------------
    @property
    def n_encoded(self) -> int:
        return next(iter(self.encoded_k.values())).shape[2] if self.encoded_k else 0

    @property
    def stored(self) -> int:
        return self.n_encoded + (self.recent_k.shape[2] if self.recent_k is not None else 0)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Keys handed to attention are the stored ones plus the step's own; the stored ones count as the most recent
        # positions so that the causal mask lets every query see them and the padding mask lines up (sinks.py).
        return self.stored + query_length, self.seen - self.stored

    def get_max_length(self) -> int:
        return -1

    # -- update ------------------------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        seen_before = self.seen
        self.seen += key_states.shape[2]
        keys = self._with_history(self.encoded_k, self.recent_k, key_states)
        values = self._with_history(self.encoded_v, self.recent_v, value_states)

        if self.encoded_k:
            self.recent_k = torch.cat([self.recent_k, key_states], dim=2)
            self.recent_v = torch.cat([self.recent_v, value_states], dim=2)
        else:  # nothing encoded: what attention sees is exactly what is stored
            self.recent_k, self.recent_v = keys, values
        if self.positions is not None:
            new = torch.arange(seen_before, self.seen, dtype=torch.int32, device=self.device)
            self.positions = torch.cat([self.positions, new.expand(self.positions.shape[0], -1)], dim=1)

        budget = self.retention.budget
        if budget is not None and self.stored > budget:
            self._evict(self._left_padding(kwargs))
        if not self.codec.lossless:
            self._encode_overflow()
        return keys, values

    def _with_history(self, encoded: Packed, recent: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        if not encoded:
            return torch.cat([recent, new], dim=2)
        n_encoded = self.n_encoded
        out = new.new_empty(*new.shape[:2], n_encoded + recent.shape[2] + new.shape[2], new.shape[3])
        self.codec.decode({k: self.tier.fetch(t, self.device) for k, t in encoded.items()}, out[:, :, :n_encoded])
        out[:, :, n_encoded : n_encoded + recent.shape[2]] = recent
        out[:, :, n_encoded + recent.shape[2] :] = new
        return out

    def _left_padding(self, kwargs: dict[str, Any]) -> torch.Tensor:
        """Left-padding length per row, from the position ids generate derives from the attention mask: the last
        token of a row with p pad tokens sits at position seen - 1 - p."""
        batch = self.recent_k.shape[0]
        position_ids = kwargs.get("kwargs", kwargs).get("position_ids")
        if position_ids is None or position_ids.shape[0] != batch or not self.retention.needs_positions:
            return torch.zeros(batch, dtype=torch.long, device=self.device)
        return (self.seen - 1 - position_ids[:, -1]).to(self.device)

    def _evict(self, pad: torch.Tensor) -> None:
        stored, n_encoded = self.stored, self.n_encoded
        keep = self.retention.keep(stored, self.positions, self.seen, pad)
        if keep is None:
            return
        if self.positions is not None:
            self.positions = _take(self.positions, keep, dim=1)
        parts = _split_keep(keep, n_encoded, stored) if n_encoded else (None, keep)
        if parts is None:  # rows keep different numbers of encoded tokens: decode them back, then evict as one
            self.recent_k = self._with_history(self.encoded_k, self.recent_k[:, :, :0], self.recent_k)
            self.recent_v = self._with_history(self.encoded_v, self.recent_v[:, :, :0], self.recent_v)
            self.encoded_k, self.encoded_v = {}, {}
            parts = (None, keep)
        keep_encoded, keep_recent = parts
        if keep_encoded is not None:
            self.encoded_k = {k: _take(t, keep_encoded) for k, t in self.encoded_k.items()}
            self.encoded_v = {k: _take(t, keep_encoded) for k, t in self.encoded_v.items()}
        self.recent_k = _take(self.recent_k, keep_recent)
        self.recent_v = _take(self.recent_v, keep_recent)

    def _encode_overflow(self) -> None:
        overflow = self.recent_k.shape[2] - self.codec.residual_tokens
        if overflow <= 0:
            return
        for name in ("k", "v"):
            recent = getattr(self, f"recent_{name}")
            new = {k: self.tier.place(t) for k, t in self.codec.encode(recent[:, :, :overflow]).items()}
            old = getattr(self, f"encoded_{name}")
            setattr(self, f"encoded_{name}", {k: torch.cat([old[k], t], dim=2) if old else t for k, t in new.items()})
            setattr(self, f"recent_{name}", _own(recent[:, :, overflow:]))

    # -- bookkeeping that generate and beam search call --------------------------------------------------------
    def _tensors(self) -> list[torch.Tensor]:
        held = [*self.encoded_k.values(), *self.encoded_v.values(), self.recent_k, self.recent_v, self.positions]
        return [t for t in held if t is not None]

    def kv_bytes(self) -> dict[str, int]:
        """Bytes this layer holds, per tier: encoded payload, scales, residual buffers and positions, counted by the
        storage the tensors keep alive (so a view pinning evicted tokens counts them)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self._tensors()}
        return {self.tier.name: sum(storages.values())}

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if not self.is_initialized:
            return
        self.encoded_k = {k: fn(t) for k, t in self.encoded_k.items()}
        self.encoded_v = {k: fn(t) for k, t in self.encoded_v.items()}
        self.recent_k, self.recent_v = fn(self.recent_k), fn(self.recent_v)
        if self.positions is not None:
            self.positions = fn(self.positions)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        if self.stored != self.seen:
            raise RuntimeError(f"cannot crop a {self.retention.name} cache that has already evicted tokens")
        keep = slice(0, self.stored + tokens_to_remove)
        self.seen = keep.stop
        encoded_keep, recent_keep = _split_keep(keep, self.n_encoded, self.stored)
        self.encoded_k = {k: _take(t, encoded_keep) for k, t in self.encoded_k.items()}
        self.encoded_v = {k: _take(t, encoded_keep) for k, t in self.encoded_v.items()}
        self.recent_k, self.recent_v = _take(self.recent_k, recent_keep), _take(self.recent_v, recent_keep)
        if self.positions is not None:
            self.positions = self.positions[:, keep]

    def reset(self) -> None:
        self.__init__(self.retention, self.codec, self.tier)

    def offload(self):
        raise NotImplementedError("use a host or disk tier (issue 4), not Cache(offloading=True)")

    prefetch = offload


class KVCache(Cache):
    """A transformers Cache whose every layer follows one StrategySpec."""

    def __init__(self, spec: StrategySpec, num_layers: int):
        super().__init__(layers=[KVLayer(spec.retention, spec.codec, spec.tier) for _ in range(num_layers)])
        self.spec = spec

    def kv_bytes(self) -> dict[str, int]:
        """Exact resident bytes per tier name, summed over layers."""
        total: dict[str, int] = {}
        for layer in self.layers:
            for tier, nbytes in layer.kv_bytes().items():
                total[tier] = total.get(tier, 0) + nbytes
        return total

    def stored_tokens(self) -> int:
        """Tokens resident per sequence (layer 0; every layer keeps the same set)."""
        return self.layers[0].stored if self.layers else 0

    def __repr__(self) -> str:
        return f"KVCache({self.spec}, layers={len(self.layers)}, seen={self.get_seq_length()})"


def decoder_config(model_or_config: Any):
    """The text decoder's config of a causal LM, or a ValueError saying why there is no KV to compress."""
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model type {config.model_type!r} is encoder-decoder; kvcompress handles decoder-only models")
    can_generate = getattr(model_or_config, "can_generate", None)
    if can_generate is not None and not can_generate():
        raise ValueError(
            f"{type(model_or_config).__name__} cannot generate (encoder-only or not a causal LM): there is no KV "
            "cache to compress; load it with AutoModelForCausalLM"
        )
    text = config.get_text_config(decoder=True)
    if getattr(text, "is_causal", True) is False:
        raise ValueError(f"model type {text.model_type!r} is not causal: there is no KV cache to compress")
    layer_types, _ = get_layer_types_and_kwargs(text)
    other = sorted(set(layer_types) - {"full_attention"})
    if other:
        raise ValueError(
            f"model type {text.model_type!r} has {', '.join(other)} layers; kvcompress compresses full-attention "
            "layers only (yet)"
        )
    return text


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def make_cache(model_or_config: Any, strategy: str | StrategySpec = "full") -> KVCache:
    """A fresh cache for one generation: `model.generate(**inputs, cache=make_cache(model, "sink+int8"))`."""
    spec = parse_strategy(strategy)
    config = decoder_config(model_or_config)
    spec.codec.check(head_dim(config), torch.float32)
    return KVCache(spec, config.num_hidden_layers)
