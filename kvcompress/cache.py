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
from transformers.cache_utils import Cache, CacheLayerMixin

from .accounting import kv_sizer
from .codecs import Codec
from .dtypes import parse_dtype
from .geometry import decoder_config, head_dim
from .retention import Retention
from .strategy import StrategySpec, parse_strategy
from .tiers import DevicePart, Part, Store, merge_bytes, no_tokens, take_tokens


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
    """One decoder layer's KV under a (retention, codec, tier) strategy. Its tokens live in parts its tier's store
    makes: the encoded tensors, and the model-dtype ones (every token for a lossless codec; else the codec's
    full-precision residual, which stays on the device: it is the hottest data and at most `residual` tokens)."""

    is_sliding = False  # the mask is the model's plain causal one, sized by get_mask_sizes
    is_compileable = False

    def __init__(self, retention: Retention, codec: Codec, store: Store, kv_dtype: torch.dtype | None = None):
        super().__init__()
        self.retention, self.codec, self.store = retention, codec, store
        self.kv_dtype = kv_dtype  # the dtype K/V are stored in (None: as they arrive); attention gets its own back
        self.seen = 0  # tokens seen (what positions and the query offset derive from), not tokens stored
        self.encoded_k: dict[str, Part] = {}
        self.encoded_v: dict[str, Part] = {}
        self.recent_k: Part | None = None
        self.recent_v: Part | None = None
        self.positions: torch.Tensor | None = None  # [batch, stored] int32, only when the retention reads them
        self.next_layer: KVLayer | None = None  # prefetched at the start of this layer's update (offloading tiers)

    @property
    def is_croppable(self) -> bool:
        return self.retention.budget is None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype  # already in the KV dtype (update casts)
        self.codec.check(key_states.shape[-1], key_states.dtype)
        part = self.store.part if self.codec.lossless else DevicePart
        self.recent_k, self.recent_v = part(no_tokens(key_states)), part(no_tokens(value_states))
        if self.retention.needs_positions:
            self.positions = torch.empty(key_states.shape[0], 0, dtype=torch.int32, device=self.device)
        self.is_initialized = True

    # -- sizes -------------------------------------------------------------------------------------------------
    @property
    def n_encoded(self) -> int:
        return len(next(iter(self.encoded_k.values()))) if self.encoded_k else 0

    @property
    def stored(self) -> int:
        return self.n_encoded + (len(self.recent_k) if self.recent_k is not None else 0)

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
        compute = key_states.dtype
        if self.kv_dtype is not None and compute != self.kv_dtype:  # cast on write, widened on read
            key_states, value_states = key_states.to(self.kv_dtype), value_states.to(self.kv_dtype)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.next_layer is not None:
            self.next_layer.prefetch()
        seen_before = self.seen
        self.seen += key_states.shape[2]
        if self.encoded_k:
            keys = self._with_history(self.encoded_k, self.recent_k, key_states, compute)
            values = self._with_history(self.encoded_v, self.recent_v, value_states, compute)
            self.recent_k.append(key_states)
            self.recent_v.append(value_states)
        else:  # nothing encoded: what attention sees is exactly what is stored
            keys, values = self.recent_k.extend(key_states), self.recent_v.extend(value_states)
            keys, values = keys.to(compute), values.to(compute)
        if self.positions is not None:
            new = torch.arange(seen_before, self.seen, dtype=torch.int32, device=self.device)
            self.positions = torch.cat([self.positions, new.expand(self.positions.shape[0], -1)], dim=1)

        budget = self.retention.budget
        if budget is not None and self.stored > budget:
            self._evict(self._left_padding(kwargs))
        if not self.codec.lossless:
            self._encode_overflow()
        if self.store.offloads:
            for part in self._parts():
                part.release()
        return keys, values

    def _with_history(self, encoded: dict[str, Part], recent: Part, new: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[encoded history decoded | recent | new] in `dtype`, the compute dtype."""
        n_encoded, held = len(next(iter(encoded.values()))) if encoded else 0, recent.read()
        out = new.new_empty(*new.shape[:2], n_encoded + held.shape[2] + new.shape[2], new.shape[3], dtype=dtype)
        self.codec.decode({name: part.read() for name, part in encoded.items()}, out[:, :, :n_encoded])
        out[:, :, n_encoded : n_encoded + held.shape[2]] = held
        out[:, :, n_encoded + held.shape[2] :] = new
        return out

    def _left_padding(self, kwargs: dict[str, Any]) -> torch.Tensor:
        """Left-padding length per row, from the position ids generate derives from the attention mask: the last
        token of a row with p pad tokens sits at position seen - 1 - p."""
        batch = self.positions.shape[0] if self.positions is not None else 1
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
            self.positions = take_tokens(self.positions, keep, dim=1)
        parts = _split_keep(keep, n_encoded, stored) if n_encoded else (None, keep)
        if parts is None:  # rows keep different numbers of encoded tokens: decode them back, then evict as one
            for name in ("k", "v"):
                encoded, recent = getattr(self, f"encoded_{name}"), getattr(self, f"recent_{name}")
                decoded = self._with_history(encoded, recent, recent.read()[:, :, :0], self.dtype)
                for part in encoded.values():
                    part.close()
                setattr(self, f"encoded_{name}", {})
                setattr(self, f"recent_{name}", DevicePart(decoded))
            parts = (None, keep)
        self._keep(*parts)

    def _encode_overflow(self) -> None:
        overflow = len(self.recent_k) - self.codec.residual_tokens
        if overflow <= 0:
            return
        for name in ("k", "v"):
            recent = getattr(self, f"recent_{name}")
            encoded = self.codec.encode(recent.read()[:, :, :overflow])
            parts = getattr(self, f"encoded_{name}")
            for key, tensor in encoded.items():
                if key not in parts:
                    parts[key] = self.store.part(no_tokens(tensor))
                parts[key].append(tensor)
            recent.keep(slice(overflow, len(recent)))

    def _keep(self, keep_encoded: slice | torch.Tensor | None, keep_recent: slice | torch.Tensor) -> None:
        for part in self._parts():
            part.keep(keep_recent if part in (self.recent_k, self.recent_v) else keep_encoded)

    # -- bookkeeping that generate and beam search call --------------------------------------------------------
    def _parts(self) -> list[Part]:
        held = [*self.encoded_k.values(), *self.encoded_v.values(), self.recent_k, self.recent_v]
        return [part for part in held if part is not None]

    def prefetch(self) -> None:
        for part in self._parts():
            part.prefetch()

    def kv_bytes(self) -> dict[str, int]:
        """Bytes this layer holds, per tier: encoded payload, scales, residual buffers and positions, counted by the
        storage the tensors keep alive (so a view pinning evicted tokens counts them)."""
        positions = {"device": self.positions.untyped_storage().nbytes()} if self.positions is not None else {}
        return merge_bytes(positions, *(part.nbytes() for part in self._parts()))

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if not self.is_initialized:
            return
        for part in self._parts():
            part.map(fn)
            part.release()
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
        self._keep(*_split_keep(keep, self.n_encoded, self.stored))
        for part in self._parts():
            part.release()
        if self.positions is not None:
            self.positions = self.positions[:, keep]

    def close(self) -> None:
        for part in self._parts():
            part.close()

    def reset(self) -> None:
        self.close()
        next_layer = self.next_layer
        self.__init__(self.retention, self.codec, self.store, self.kv_dtype)
        self.next_layer = next_layer

    def offload(self):
        raise NotImplementedError("use a host or disk tier (kvcompress strategy `...+host`), not Cache(offloading=True)")


class KVCache(Cache):
    """A transformers Cache whose every layer follows one StrategySpec. Close it (or use it as a context manager)
    to release offload files and pinned blocks now rather than at garbage collection."""

    def __init__(self, spec: StrategySpec, num_layers: int, planned_bytes: int = 0, offload_dir: str | None = None,
                 kv_dtype: torch.dtype | None = None):
        self.spec, self.kv_dtype = spec, kv_dtype
        self.store = spec.tier.open(planned_bytes, offload_dir)
        super().__init__(layers=[KVLayer(spec.retention, spec.codec, self.store, kv_dtype) for _ in range(num_layers)])
        if self.store.offloads:  # each layer prefetches the next; the last one the first, for the next step
            for layer, following in zip(self.layers, self.layers[1:] + self.layers[:1]):
                layer.next_layer = following

    def kv_bytes(self) -> dict[str, int]:
        """Exact resident bytes per tier name (device, host, disk), summed over layers, plus the store's staging."""
        return merge_bytes(*(layer.kv_bytes() for layer in self.layers), self.store.nbytes())

    def transfer_stats(self) -> dict[str, float]:
        """Bytes moved device<->host and to/from disk, seconds spent copying, seconds the host waited, so far."""
        return self.store.stats()

    def stored_tokens(self) -> int:
        """Tokens resident per sequence (layer 0; every layer keeps the same set)."""
        return self.layers[0].stored if self.layers else 0

    def close(self) -> None:
        for layer in self.layers:
            layer.close()
        self.store.close()

    def __enter__(self) -> KVCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KVCache({self.spec}, layers={len(self.layers)}, seen={self.get_seq_length()})"


def make_cache(
    model_or_config: Any,
    strategy: str | StrategySpec = "full",
    *,
    kv_dtype: str | torch.dtype | None = None,
    offload_dir: str | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1,
) -> KVCache:
    """A fresh cache for one generation: `model.generate(**inputs, cache=make_cache(model, "sink+int8"))`.

    kv_dtype: the dtype full-precision K/V are stored in, whatever the model computes in (default: the model's
    `kv_dtype` attribute, which `load_model` sets, else K/V stay as they arrive). offload_dir: where the disk tier
    puts its file (default: the system temporary directory; strategies without a disk tier write no file).
    max_tokens, batch_size: the most KV the cache will hold, which the disk tier checks for room before generation
    starts (default: the model's context).
    """
    spec = parse_strategy(strategy)
    config = decoder_config(model_or_config)
    kv_dtype = parse_dtype(kv_dtype, "kv_dtype") or getattr(model_or_config, "kv_dtype", None)
    model_dtype = getattr(model_or_config, "dtype", None)
    stored_dtype = kv_dtype or (model_dtype if isinstance(model_dtype, torch.dtype) else None)
    spec.codec.check(head_dim(config), stored_dtype or torch.float32)
    tokens = max_tokens or getattr(config, "max_position_embeddings", None) or 4096
    planned = kv_sizer(config, spec, stored_dtype).bytes(tokens, batch_size)
    return KVCache(spec, config.num_hidden_layers, planned, offload_dir, kv_dtype)
