"""The transformers glue: one cache layer composed of a retention, a codec and a tier; the container only routes.
The layer's jobs live in three files: the transformers layer API here (`KVLayer`), storage and bookkeeping in
layer_storage.py, the seam's steps in layer_seam.py.

A layer holds, per stored token, either its encoded form (`encoded_k/v`, older tokens) or its model-dtype form
(`recent_k/v`, the codec's full-precision residual; every token when the codec is lossless). Retention runs after
each update on the whole stored sequence, then the residual's overflow is encoded: only new tokens are ever
quantized. `update` returns decoded K/V for attention; a fused attention path can later take the encoded form
instead (docs/design.md: AttentionInterface + AttentionMaskInterface).

A retention that reads attention or keys runs on the attention seam (`attention.py`): `update` only hands the step's
K/V over, and `attend` runs the step: attention over [stored | step] with the layer's own mask (heads may keep
different tokens), the statistics the retention asked for, eviction, encoding; with `prefill_chunk`, chunk by chunk.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import saving
from .accounting import kv_sizer
from .attention import hand_over, route, route_grouped
from .codecs import Codec
from .dtypes import cast_on_write, dtype_name, parse_dtype
from .geometry import decoder_config, head_dim
from .kernels.decode import supports
from .layer_seam import SeamSteps
from .layer_storage import LayerStorage, Workspace, held_bytes, split_keep
from .retention import RETENTIONS, Retention
from .static import StaticKVLayer
from .strategy import StrategySpec, parse_strategy
from .tiers import DEVICE_MEMORY, DevicePart, Part, Store, merge_bytes, no_tokens


class KVLayer(SeamSteps, LayerStorage, CacheLayerMixin):
    """One decoder layer's KV under a (retention, codec, tier) strategy. Its tokens live in parts its tier's store
    makes: the encoded tensors, and the model-dtype ones (every token for a lossless codec; else the codec's
    full-precision residual, which stays on the device: it is the hottest data and at most `residual` tokens)."""

    is_sliding = False  # the mask is the model's plain causal one, sized by get_mask_sizes
    is_compileable = False

    def __init__(
        self,
        retention: Retention,
        codec: Codec,
        store: Store,
        kv_dtype: torch.dtype | None = None,
        layer_idx: int = 0,
        layers: int = 1,
        prefill_chunk: int | None = None,
        fused: bool = False,
    ):
        super().__init__()
        self.retention, self.codec, self.store = retention, codec, store
        self.kv_dtype = kv_dtype  # the dtype K/V are stored in (None: as they arrive); attention gets its own back
        self.layer_idx, self.layers, self.prefill_chunk = layer_idx, layers, prefill_chunk
        self.fused = fused and not codec.lossless  # decode steps attend over the codes (the model is routed)
        self.seen = 0  # tokens seen (what positions and the query offset derive from), not tokens stored
        self.encoded_k: dict[str, Part] = {}
        self.encoded_v: dict[str, Part] = {}
        self.recent_k: Part | None = None
        self.recent_v: Part | None = None
        # positional retentions: [batch, stored] index in the padded sequence; seam retentions: [batch, heads, stored]
        # position id of each token in its row, -1 for padding and filler
        self.positions: torch.Tensor | None = None
        self.mass: torch.Tensor | None = None  # [batch, heads, stored] float32 accumulated attention ("mass")
        self.steps = self.last_eviction = 0  # finished steps, and the step count at the last eviction
        self.resident_bytes = 0  # what kv_bytes() summed to after the last step (for the cache's peak)
        self.transient_bytes = 0  # what the last step allocated beside the storage (decoded copies, attention)
        # told each step's change of resident bytes and its transient bytes (the cache's peak)
        self.on_step: Callable[[int, int], None] | None = None
        self.next_layer: KVLayer | None = None  # prefetched at the start of this layer's update (offloading tiers)
        self.workspace: Workspace | None = None  # where decoded history goes for attention (the cache's, shared)
        self._stash: tuple[torch.Tensor, torch.Tensor, torch.dtype] | None = None  # seam: the step's K/V until attend
        # [batch, heads, stored] float32 while a pass over the context scores what is stored (a retention's
        # `after_prompt`): steps then only score the stored
        self.reconstruction: torch.Tensor | None = None

    @property
    def is_croppable(self) -> bool:
        return not self.retention.evicts

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype  # already in the KV dtype (update casts)
        self.codec.check(key_states.shape[-1], key_states.dtype)
        part = self.store.part if self.codec.lossless else (lambda t: DevicePart(t, self.store.grow))
        self.recent_k, self.recent_v = part(no_tokens(key_states)), part(no_tokens(value_states))
        if self.retention.needs_positions:
            shape = key_states.shape[:2] if self.retention.seam else key_states.shape[:1]
            self.positions = torch.empty(*shape, 0, dtype=torch.int32, device=self.device)
        if "mass" in self.retention.needs:
            self.mass = torch.empty(*key_states.shape[:2], 0, dtype=torch.float32, device=self.device)
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Keys handed to attention are the stored ones plus the step's own; the stored ones count as the most recent
        # positions so that the causal mask lets every query see them and the padding mask lines up (sinks.py).
        return self.stored + query_length, self.seen - self.stored

    def get_max_length(self) -> int:
        return -1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        compute = key_states.dtype
        key_states, value_states = cast_on_write(self.kv_dtype, key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.next_layer is not None:
            self.next_layer.prefetch()
        if self.retention.seam or self._fuses(key_states.shape[2]):
            self._stash = (key_states, value_states, compute)
            hand_over(self, key_states)
            return key_states, value_states
        if self.encoded_k:
            keys = self._with_history("k", key_states, compute, for_attention=True)
            values = self._with_history("v", value_states, compute, for_attention=True)
            if self.codec.residual_tokens:
                self.recent_k.append(key_states)
                self.recent_v.append(value_states)
            else:  # no residual: the step's tokens go straight into the codes, not through recent and back
                self._append_encoded(key_states, value_states)
        else:  # nothing encoded: what attention sees is exactly what is stored
            keys, values = self.recent_k.extend(key_states), self.recent_v.extend(value_states)
            keys, values = keys.to(compute), values.to(compute)
        self._store_plain(key_states, kwargs)
        shares_storage = self.codec.lossless and not self.store.offloads and keys.dtype == self.dtype
        self._end_step(0 if shares_storage else held_bytes(keys, values))  # else decoded/widened copies
        return keys, values

    def restore(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        attention: torch.Tensor | None,
        mass: torch.Tensor | None,
        compute: torch.dtype,
        transient_bytes: int = 0,
        positions: torch.Tensor | None = None,
    ) -> None:
        """Store a prompt prefilled elsewhere as if this layer had run it: K/V [batch, heads, tokens, dim], the last
        rows of its pooled attention [batch, heads, rows, tokens] and each token's attention mass [batch, heads,
        tokens]; eviction then sees what it would have seen (exact when it reads at most those rows).
        transient_bytes: what the step's attention allocated where it ran, for the cache's peak. positions [batch,
        tokens]: each token's position in its row, -1 for left padding (None: no padding)."""
        if self.kv_dtype is not None:
            keys, values = keys.to(self.kv_dtype), values.to(self.kv_dtype)
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        batch, heads, n = keys.shape[:3]
        if positions is None:
            positions = torch.arange(self.seen, self.seen + n, dtype=torch.int32, device=self.device).expand(batch, n)
        self._store_step(keys, values, positions, attention, mass, compute)
        self.steps += 1
        self._end_step(transient_bytes)

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
        self._keep(*split_keep(keep, self.n_encoded, self.stored))
        for part in self._parts():
            part.release()
        if self.positions is not None:
            self.positions = self.positions[..., keep]
        if self.mass is not None:
            self.mass = self.mass[..., keep]

    def reset(self) -> None:
        self.close()
        if self.on_step is not None:
            self.on_step(-self.resident_bytes, 0)
        wiring = self.next_layer, self.on_step, self.workspace  # reset keeps the wiring the cache gave the layer
        self.__init__(
            self.retention,
            self.codec,
            self.store,
            self.kv_dtype,
            self.layer_idx,
            self.layers,
            self.prefill_chunk,
            self.fused,
        )
        self.next_layer, self.on_step, self.workspace = wiring

    def offload(self):
        raise NotImplementedError(
            "use a host or disk tier (kvcompress strategy `...+host`), not Cache(offloading=True)"
        )


class KVCache(Cache):
    """A transformers Cache whose every layer follows one StrategySpec. Close it (or use it as a context manager)
    to release offload files and pinned blocks now rather than at garbage collection."""

    def __init__(
        self,
        spec: StrategySpec,
        num_layers: int,
        planned_bytes: int = 0,
        offload_dir: str | None = None,
        kv_dtype: torch.dtype | None = None,
        prefill_chunk: int | None = None,
        fused: bool = False,
        grow: int = 0,
        static_tokens: int | None = None,
    ):
        self.spec, self.kv_dtype = spec, kv_dtype
        self.store = spec.tier.open(planned_bytes, offload_dir)
        self.store.grow = grow
        if static_tokens is not None:  # compile=True: storage for that many tokens, a step that can be captured
            layers = [StaticKVLayer(spec.codec, static_tokens, kv_dtype) for _ in range(num_layers)]
        else:
            layers = [
                KVLayer(spec.retention, spec.codec, self.store, kv_dtype, i, num_layers, prefill_chunk, fused)
                for i in range(num_layers)
            ]
        super().__init__(layers=layers)
        self.after_prompt_due = spec.retention.acts_after_prompt  # the retention's `after_prompt` is still to run
        self.resident_bytes = 0  # what every layer held after its last step
        self.peak_bytes = 0  # most KV bytes held at once: resident in every layer plus the step's transient copies
        self.workspace = Workspace()
        self.model: Any = None  # what the cache was made for (make_cache sets it; `save` fingerprints it)
        self.planned_tokens, self.planned_batch = None, 1  # the room make_cache planned, per row and rows
        for layer in self.layers:
            layer.on_step, layer.workspace = self._note_step, self.workspace
        if self.store.offloads:  # each layer prefetches the next; the last one the first, for the next step
            for layer, following in zip(self.layers, self.layers[1:] + self.layers[:1]):
                layer.next_layer = following

    @property
    def fused(self) -> bool:
        """Whether decode steps attend over the codes (as every layer does)."""
        return bool(self.layers) and self.layers[0].fused

    @property
    def static(self) -> bool:
        """Whether every step has the same shapes (make_cache's compile=True), so it can be compiled whole."""
        return self.is_compileable

    def _note_step(self, resident_change: int, transient_bytes: int) -> None:
        self.resident_bytes += (
            resident_change  # a running sum: summing every layer at every layer's step is O(layers^2)
        )
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes + transient_bytes)

    def reset(self) -> None:
        super().reset()
        self.after_prompt_due = self.spec.retention.acts_after_prompt  # the next prompt is acted on again

    def after_prompt(self, model: Any, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
        """Once the prompt is stored (the first forward, or a replayed prefill), run the retention's `after_prompt`
        if it is due: once per prompt, so the forwards it makes itself do not run it again."""
        if self.after_prompt_due:
            self.after_prompt_due = False
            self.spec.retention.after_prompt(model, self, input_ids, attention_mask)

    def save(self, path: str | Path) -> int:
        """Save what this cache holds to `path` (a safetensors file: saving.py), as stored: every layer's encoded
        parts, model-dtype tokens, positions and score state, with the strategy, the model's identity and dtypes in
        its header. Atomic: a failed save leaves the previous file. Returns the bytes on disk (to set beside
        `kv_bytes()`). `load_cache(model, path)` continues from here bit for bit."""
        header, tensors = self._saved_state()
        return saving.write(path, tensors, {**header, "model": saving.model_identity(self._source_model())})

    def copy(self) -> KVCache:
        """A second cache holding what this one holds, as stored (nothing decoded or re-encoded), made as this one
        was: `save` then `load_cache` without the file. The two then continue apart, bit for bit as this one would
        have (several sessions with the same prompt, each prefilled once)."""
        header, tensors = self._saved_state()
        return _restored(self._source_model(), header, tensors, self.spec)

    def _source_model(self) -> Any:
        source = self.model() if isinstance(self.model, weakref.ref) else self.model
        if source is None:
            raise ValueError("the model this cache was made for is gone: save or copy the cache while it is alive")
        return source

    def _saved_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The header (strategy, dtype, counters, how the cache was made; not the model's identity) and the CPU
        tensors `save` writes and `load_cache` rebuilds from."""
        if self.static:
            raise ValueError("a compile=True cache holds preallocated storage: save a cache made without compile")
        if not self.layers or not self.layers[0].is_initialized:
            raise ValueError("this cache holds no tokens yet: save it after a forward")
        tensors, layers = {}, []
        for i, layer in enumerate(self.layers):
            state, counters = layer.saved_state()
            tensors.update({f"{i}.{name}": t for name, t in state.items()})
            layers.append({**counters, "stored": layer.stored})
        first = self.layers[0]
        header = {
            "strategy": str(self.spec),
            "kv_dtype": dtype_name(first.dtype),
            "seen": self.get_seq_length(),
            "stored": self.stored_tokens(),
            "batch": tensors["0.recent_k"].shape[0],
            "after_prompt_due": self.after_prompt_due,
            # how the cache was made beside its strategy: what its next steps compute and how its storage grows
            "make_cache": {
                "fused": self.fused,
                "prefill_chunk": first.prefill_chunk,
                "grow": self.store.grow,
                "max_tokens": self.planned_tokens,
                "batch_size": self.planned_batch,
            },
            "layers": layers,
        }
        return header, tensors

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
    prefill_chunk: int | None = None,
    fused: bool | None = None,
    grow: int = 0,
    compile: bool = False,
) -> KVCache:
    """A fresh cache for one generation: `model.generate(**inputs, cache=make_cache(model, "sink+int8"))`.

    kv_dtype: the dtype full-precision K/V are stored in, whatever the model computes in (default: the model's
    `kv_dtype` attribute, which `load_model` sets, else K/V stay as they arrive). offload_dir: where the disk tier
    puts its file (default: the system temporary directory; strategies without a disk tier write no file).
    max_tokens, batch_size: the most KV the cache will hold, which the disk tier checks for room before generation
    starts (default: the model's context). prefill_chunk: a score-based retention prefills prompts this many tokens
    at a time, evicting between chunks, so the KV a prompt holds stays within budget + chunk. fused: decode steps of
    a quantizing codec attend over the codes instead of decoding the history every step (the Triton kernel on CUDA for
    int8/fp8/int4, a chunked torch path elsewhere); None (default): where the Triton kernel runs and the model's
    attention can be routed through the seam (a model, not a config; no sliding-window or softcapped attention); on
    CPU the chunked path is slower than decoding into torch's fused attention (results/core), so None decodes there.
    True: fused anywhere (or an error), False: always decode. grow: device storage grows this many tokens at a time
    into preallocated room, so a decode step writes in place instead of concatenating (0: exactly what is held);
    `kv_bytes()` then counts the room too, which `expected_kv_bytes` does not. compile: a static decode step (the
    `full` retention on the device tier, any codec without a residual): storage for `max_tokens` tokens is allocated
    at the first step and written in place, so every step has the same shapes and `torch.compile` captures it whole:
    `kvcompress.compiled_step(model)` (CUDA graphs on a GPU), or `generate`, which compiles it by itself on CUDA.

    A score-based retention (h2o, snapkv, ...) routes the model's attention through the kvcompress seam, so pass
    the model, not its config; the model's own attention still serves every call without a kvcompress cache.
    """
    spec = parse_strategy(strategy)
    if prefill_chunk is not None:
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive number of tokens, got {prefill_chunk!r}")
        if not spec.retention.seam:
            raise ValueError(
                f"prefill_chunk needs a score-based retention ({', '.join(seam_retentions())}); "
                f"{spec.retention.name!r} already evicts before each step's attention"
            )
    spec.retention.check_cache(model_or_config, prefill_chunk)
    if spec.retention.acts_after_prompt:
        _hook_after_prompt(model_or_config)
    config = decoder_config(model_or_config)
    if not isinstance(grow, int) or isinstance(grow, bool) or grow < 0:
        raise ValueError(f"grow must be a number of tokens >= 0 (0: storage holds exactly its tokens), got {grow!r}")
    if fused not in (None, True, False):
        raise ValueError(f"fused must be None (where the model allows), True or False, got {fused!r}")
    if compile not in (True, False):
        raise ValueError(
            f"compile must be True (a static decode step that torch.compile captures) or False, got {compile!r}"
        )
    if compile:
        _check_static(spec, max_tokens, prefill_chunk, fused, grow)
        fused = False
    if spec.codec.lossless:
        fused = False
    elif fused is None:
        device = getattr(model_or_config, "device", None)
        fused = (
            getattr(device, "type", None) == "cuda"
            and supports(spec.codec, head_dim(config))
            and _routable(model_or_config, config)
        )
    if spec.retention.seam or fused:
        route(model_or_config)
    elif compile and hasattr(model_or_config, "set_attn_implementation"):
        route_grouped(model_or_config)  # a static step always passes a mask: sdpa must not repeat K/V for it
    kv_dtype = parse_dtype(kv_dtype, "kv_dtype") or getattr(model_or_config, "kv_dtype", None)
    model_dtype = getattr(model_or_config, "dtype", None)
    stored_dtype = kv_dtype or (model_dtype if isinstance(model_dtype, torch.dtype) else None)
    spec.codec.check(head_dim(config), stored_dtype or torch.float32)
    tokens = max_tokens or getattr(config, "max_position_embeddings", None) or 4096
    planned = kv_sizer(config, spec, stored_dtype).bytes(tokens, batch_size)
    cache = KVCache(
        spec,
        config.num_hidden_layers,
        planned,
        offload_dir,
        kv_dtype,
        prefill_chunk,
        fused,
        grow,
        tokens if compile else None,
    )
    cache.planned_tokens, cache.planned_batch = tokens, batch_size  # the room planned, which `save` records
    # what `save` fingerprints: a model is held weakly (a cache must not keep it alive), a config as it is
    is_module = isinstance(model_or_config, torch.nn.Module)
    cache.model = weakref.ref(model_or_config) if is_module else model_or_config
    return cache


def load_cache(
    model_or_config: Any,
    path: str | Path,
    *,
    strategy: str | StrategySpec | None = None,
    kv_dtype: str | torch.dtype | None = None,
    tier: str | None = None,
    offload_dir: str | None = None,
    max_tokens: int | None = None,
) -> KVCache:
    """A fresh cache holding what `KVCache.save` wrote to `path`, for `model_or_config`, to continue generating
    from (bit-identical to the cache that was saved). strategy, kv_dtype: what the caller expects (default: the
    file's); a file for another strategy, K/V dtype or model (shape or weights) is refused, naming what differs.
    tier: put the tokens on another tier than the saved strategy's (e.g. "disk", "host:policy=cold"): where tokens
    live changes no code or value, so decoding is the same. offload_dir: where a disk tier puts its file;
    max_tokens: the most tokens a row will hold, which a disk tier checks room for (default: the saved cache's).
    The cache is made as the saved one was (fused, prefill_chunk, grow, its planned room), each layer's tokens on the
    device its decoder layer computes on. Raises ValueError naming the file for a missing, truncated or corrupt
    one; nothing on disk is changed."""
    header, tensors = saving.read(path)
    saved = parse_strategy(header["strategy"])
    if strategy is not None and str(parse_strategy(strategy)) != str(saved):
        raise ValueError(f"{str(path)!r} holds a {saved} cache, not {parse_strategy(strategy)}")
    if tier is not None:
        saved = dataclasses.replace(saved, tier=_tier(tier))
    saving.check_model(path, header["model"], model_or_config)
    wanted = parse_dtype(kv_dtype, "kv_dtype") or getattr(model_or_config, "kv_dtype", None)
    if wanted is not None and dtype_name(wanted) != header["kv_dtype"]:
        raise ValueError(f"{str(path)!r} stores K/V in {header['kv_dtype']}, not {dtype_name(wanted)} (kv_dtype)")
    return _restored(model_or_config, header, tensors, saved, offload_dir, max_tokens)


def _restored(
    model_or_config: Any,
    header: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    spec: StrategySpec,
    offload_dir: str | None = None,
    max_tokens: int | None = None,
) -> KVCache:
    """A cache for `spec`, made as `header` says the saved one was, holding `tensors` (KVCache._saved_state's)."""
    cache = make_cache(
        model_or_config,
        spec,
        kv_dtype=header["kv_dtype"],
        offload_dir=offload_dir,
        **{**header["make_cache"], **({"max_tokens": max_tokens} if max_tokens else {})},
    )
    try:
        devices = _layer_devices(model_or_config, len(cache.layers))
        for i, (layer, counters, device) in enumerate(zip(cache.layers, header["layers"], devices)):
            prefix = f"{i}."
            state = {name[len(prefix) :]: t.to(device) for name, t in tensors.items() if name.startswith(prefix)}
            layer.load_saved(state, counters)
    except BaseException:
        cache.close()
        raise
    cache.after_prompt_due = header["after_prompt_due"]
    return cache


def _layer_devices(model_or_config: Any, layers: int) -> list[torch.device]:
    """The device each of the model's `layers` decoder layers computes on (a model split over devices by device_map
    puts layers on several), else the model's device; the CPU for a config."""
    default = getattr(model_or_config, "device", torch.device("cpu"))
    decoder = model_or_config.get_decoder() if hasattr(model_or_config, "get_decoder") else None
    blocks = list(getattr(decoder, "layers", []))
    if len(blocks) != layers:
        return [default] * layers
    return [next(block.parameters(), torch.empty(0, device=default)).device for block in blocks]


def _tier(text: str):
    """The tier member `text` names (a tier alone, in the strategy grammar)."""
    spec = parse_strategy(text)
    if str(spec) != str(StrategySpec(tier=spec.tier)):
        raise ValueError(f"tier must name a tier alone (e.g. disk, host:policy=cold), got {text!r}")
    return spec.tier


def static_refusal(spec: StrategySpec) -> str | None:
    """Why `spec` has no static decode step (compile=True), or None when it has one."""
    if spec.retention.evicts or spec.tier.memory != DEVICE_MEMORY:
        return (
            f"compile=True keeps every token in storage allocated once: it needs a retention that never evicts, "
            f"the retention full on the device tier, got {spec}"
        )
    if spec.codec.residual_tokens:
        return (
            f"compile=True stores every token encoded: {spec.codec.name}:residual must be 0, "
            f"got {spec.codec.residual_tokens}"
        )
    return None


def _check_static(
    spec: StrategySpec, max_tokens: int | None, prefill_chunk: int | None, fused: bool | None, grow: int
) -> None:
    """Refuse, by name, what a static decode step cannot do."""
    refusal = static_refusal(spec)
    if refusal:
        raise ValueError(refusal)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(
            "compile=True allocates storage once: max_tokens must be the most tokens a sequence will hold "
            f"(prompt + new tokens), got {max_tokens!r}"
        )
    for name, value, default in (("prefill_chunk", prefill_chunk, None), ("fused", fused, None), ("grow", grow, 0)):
        if value not in (default, False):
            raise ValueError(f"compile=True has storage of its own: leave {name} out, got {name}={value!r}")


def _hook_after_prompt(model: Any) -> None:
    """Register, once per model, the forward hook that runs a retention's `after_prompt` after a cache's first
    forward."""
    if not getattr(model, "_kvcompress_after_prompt", False):
        model.register_forward_hook(_after_forward, with_kwargs=True)
        model._kvcompress_after_prompt = True


def _after_forward(model: Any, args: tuple, kwargs: dict, output: Any) -> None:
    """A model forward hook: hand a KVCache the prompt its forward stored (`KVCache.after_prompt`)."""
    cache = kwargs.get("cache")
    if isinstance(cache, KVCache) and cache.after_prompt_due:
        cache.after_prompt(model, kwargs.get("input_ids", args[0] if args else None), kwargs.get("attention_mask"))


def _routable(model: Any, config: Any) -> bool:
    """Whether fused decode can take the model's attention: a transformers model dispatching through
    AttentionInterface whose layers neither slide a window nor softcap their logits."""
    return (
        getattr(model, "_supports_attention_backend", False)
        and hasattr(model, "set_attn_implementation")
        and getattr(config, "sliding_window", None) is None
        and getattr(config, "attn_logit_softcapping", None) is None
    )


def seam_retentions() -> list[str]:
    return [name for name in RETENTIONS.names() if RETENTIONS.get(name).seam]
