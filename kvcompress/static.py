"""The static decode step (make_cache(..., compile=True)): every layer's storage is allocated once, for `max_tokens`
tokens, and a step writes its tokens in place at the stored length (a tensor, so no Python value changes between
steps). Every decode step then has the same shapes and no data-dependent Python, so `torch.compile` captures the
whole step (`fullgraph`; CUDA graphs on a GPU) and transformers' `generate` compiles it on its own on CUDA.

Attention reads the whole room: the slots not yet written are later than every query, so the model's causal mask
hides them (`get_mask_sizes` reports the room, as transformers' StaticLayer does). A quantizing codec encodes the
step's tokens into the room and decodes the room for attention, the step's own tokens kept exact (as KVLayer does).
No eviction: a static step keeps every token (retention `full`, device tier).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from transformers import CompileConfig
from transformers.cache_utils import CacheLayerMixin

from .codecs import Codec
from .dtypes import cast_on_write


class StaticKVLayer(CacheLayerMixin):
    """One decoder layer's KV in storage for `room` tokens, written in place; `length` tokens of it are held."""

    is_sliding = False
    is_compileable = True
    is_croppable = True

    def __init__(self, codec: Codec, room: int, kv_dtype: torch.dtype | None = None):
        super().__init__()
        self.codec, self.room, self.kv_dtype = codec, room, kv_dtype
        self.k: dict[str, torch.Tensor] = {}  # name -> [batch, heads, room, width]: the K tokens (encoded or not)
        self.v: dict[str, torch.Tensor] = {}
        # a tensor, so that a compiled step reads it instead of specialising on its value
        self.length = torch.zeros((), dtype=torch.long)
        self.fused = False  # attention reads the room decoded, never the codes
        self.resident_bytes = 0  # what kv_bytes() sums to (the room: the same at every step)
        self.transient_bytes = 0  # what a step allocates beside the storage (the room decoded or widened, K and V)
        self.on_step: Callable[[int, int], None] | None = None  # told the change of resident bytes, and the transient

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.codec.check(key_states.shape[-1], key_states.dtype)
        for name, states in (("k", key_states), ("v", value_states)):
            one = self._encode(states[:, :, :1])
            setattr(self, name, {key: t.new_zeros(*t.shape[:2], self.room, t.shape[3]) for key, t in one.items()})
        self.length = self.length.to(self.device)
        if not torch.compiler.is_compiling():  # fixed addresses: CUDA graphs then read the storage in place
            for tensor in (*self.k.values(), *self.v.values(), self.length):
                torch._dynamo.mark_static_address(tensor)
        self.is_initialized = True

    def _encode(self, states: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"x": states} if self.codec.lossless else self.codec.encode(states)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        compute = key_states.dtype
        key_states, value_states = cast_on_write(self.kv_dtype, key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._note_step(key_states, compute)
        if not torch.compiler.is_compiling() and int(self.length) + key_states.shape[2] > self.room:
            raise ValueError(
                f"the static cache holds max_tokens={self.room} tokens per sequence; this step would make "
                f"it {int(self.length) + key_states.shape[2]}: make the cache with a larger max_tokens"
            )
        slots = torch.arange(key_states.shape[2], device=self.device) + self.length
        self.length.add_(key_states.shape[2])
        return self._write(self.k, key_states, slots, compute), self._write(self.v, value_states, slots, compute)

    def _write(
        self, storage: dict[str, torch.Tensor], states: torch.Tensor, slots: torch.Tensor, compute: torch.dtype
    ) -> torch.Tensor:
        """Store `states` at `slots` and return the whole room as attention reads it, in the compute dtype."""
        for key, tensor in self._encode(states).items():
            # index_put_: compiled, it writes in place (index_copy_ copied the room), float8 included. Detached:
            # storage written with grad enabled (a prefill outside no_grad) became part of autograd, and a compiled
            # step mutating it corrupted memory (torch 2.13, CPU: a crashed process)
            storage[key][:, :, slots] = tensor.detach()
        if self.codec.lossless:
            return storage["x"].to(compute)
        room = states.new_empty(*states.shape[:2], self.room, states.shape[3], dtype=compute)
        self.codec.decode(storage, room)
        return room.index_copy_(2, slots, states.to(compute))  # the step's own tokens attend exact, as in KVLayer

    def _note_step(self, states: torch.Tensor, compute: torch.dtype) -> None:
        """Tell the cache its peak once: with static storage every step holds and allocates the same bytes."""
        batch, heads, _, head_dim = states.shape
        widened = not self.codec.lossless or compute != self.dtype
        self.transient_bytes = 2 * batch * heads * self.room * head_dim * compute.itemsize if widened else 0
        resident = sum(self.kv_bytes().values())
        if self.on_step is not None:
            self.on_step(resident - self.resident_bytes, self.transient_bytes)
        self.resident_bytes = resident

    @property
    def stored(self) -> int:
        return int(self.length)

    @property
    def seen(self) -> int:
        return int(self.length)

    def get_seq_length(self) -> torch.Tensor | int:
        if not self.is_initialized:
            return 0
        return self.length if torch.compiler.is_compiling() else int(self.length)  # compiled: never a value to guard

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.room, 0

    def get_max_length(self) -> int:
        return self.room

    def kv_bytes(self) -> dict[str, int]:
        """The room, every slot counted, written or not: what the device holds (`expected_kv_bytes` of max_tokens)."""
        if not self.is_initialized:
            return {}
        tensors = (*self.k.values(), *self.v.values())
        return {"device": sum(t.untyped_storage().nbytes() for t in tensors)}

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for storage in (self.k, self.v):
            for key, tensor in storage.items():
                mapped = fn(tensor)
                if mapped.shape == tensor.shape:  # in place: the addresses a captured step reads stay
                    tensor.copy_(mapped)
                else:
                    storage[key] = mapped

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._map(lambda t: t[indices, ...])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        self.length.sub_(-tokens_to_remove)  # the slots after it are overwritten by the next step

    def reset(self) -> None:
        self.length.zero_()

    def close(self) -> None:
        pass


RECOMPILES = 64  # a report compiles one step per (codec, batch, room size); past dynamo's default 8 it runs eager


def compiled_step(model) -> Callable:
    """The model's forward compiled whole (`fullgraph`) for the decode steps of a static cache: inductor, and CUDA
    graphs on a GPU (transformers' `get_compiled_call`, which `generate` uses). Compiles on its first call per codec
    and storage size."""
    if model.device.type != "cuda":
        warnings.warn(
            "compiled_step on CPU is experimental: inductor's CPU code for the static step (torch 2.13) gave "
            "NaN logits for int8 under AVX2 code generation and corrupted the heap now and then; the step "
            "is built for CUDA graphs",
            stacklevel=2,
        )
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILES)
    mode = "reduce-overhead" if model.device.type == "cuda" else "default"
    # static shapes: a symbolic graph compiles several times slower, and CUDA graphs want fixed shapes anyway
    compiled = model.get_compiled_call(CompileConfig(fullgraph=True, dynamic=False, mode=mode))

    def step(*args, **kwargs):
        with torch.no_grad():  # a decode step is inference; with grad enabled inductor compiles a training graph,
            return compiled(*args, **kwargs)  # whose int8 step gave NaN logits on AVX2 (torch 2.13, CPU)

    return step


def capture(device: torch.device | str) -> str:
    """How `compiled_step` captures a step on `device`, as records say it."""
    return (
        "torch.compile (inductor) + CUDA graphs" if torch.device(device).type == "cuda" else "torch.compile (inductor)"
    )
