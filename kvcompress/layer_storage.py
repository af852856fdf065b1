"""A cache layer's storage and bookkeeping: which tokens it holds and in what form, their positions and score state,
eviction, encoding the residual's overflow, and the bytes it holds per tier. `KVLayer` (cache.py) is this plus the
transformers layer API and the seam's steps (layer_seam.py); the attributes these methods read are set there."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .retention.base import Kept, RetentionView
from .tiers import DEVICE_MEMORY, DevicePart, Part, merge_bytes, no_tokens, take_tokens


def held_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the memory the tensors live in (a workspace view: the whole buffer)."""
    return sum(t.untyped_storage().nbytes() for t in tensors)


def split_keep(keep: slice | torch.Tensor, n_encoded: int, stored: int):
    """Split a keep over [encoded | recent] storage into one keep per part, or None where rows differ in how many
    tokens they keep in a part (possible only on a multi-token step before the first eviction). A slice keeps
    [start, stop) with stop >= n_encoded."""
    if isinstance(keep, slice):
        start, stop = keep.start, keep.stop
        return slice(min(start, n_encoded), min(stop, n_encoded)), slice(max(start - n_encoded, 0), stop - n_encoded)
    in_encoded = (keep < n_encoded).sum(-1)
    if (in_encoded != in_encoded.flatten()[0]).any():
        return None
    cut = int(in_encoded.flatten()[0])
    return keep[..., :cut], keep[..., cut:] - n_encoded


class Workspace:
    """Memory a cache's layers decode their history into, one layer after the other: a step's decoded K/V are dead
    once the layer's attention has read them, so every layer reuses the same two buffers (K, V), grown in chunks of
    `GROW` tokens. A fresh buffer per layer per step, one token longer each step, was mapped anew and page-faulted
    by the CPU allocator: writing the decoded history cost several times what it costs into memory already touched."""

    GROW = 256

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def take(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A [batch, heads, tokens, dim] view of `slot`'s buffer, reallocated only when it is too small or unlike."""
        buffer = self.buffers.get(slot)
        if (
            buffer is None
            or buffer.dtype != dtype
            or buffer.device != device
            or buffer.shape[:2] != shape[:2]
            or buffer.shape[3] != shape[3]
            or buffer.shape[2] < shape[2]
        ):
            room = -(-shape[2] // self.GROW) * self.GROW
            buffer = self.buffers[slot] = torch.empty(*shape[:2], room, shape[3], dtype=dtype, device=device)
        return buffer[:, :, : shape[2]]


class LayerStorage:
    """Storage and bookkeeping of one decoder layer's KV (the state itself is set by KVLayer.__init__): tokens in
    the parts its tier's store makes, encoded (`encoded_k/v`) or in the model dtype (`recent_k/v`), their positions and
    attention mass, the retention's eviction after each step, and the resident bytes the cache's peak adds up."""

    @property
    def n_encoded(self) -> int:
        return len(next(iter(self.encoded_k.values()))) if self.encoded_k else 0

    @property
    def stored(self) -> int:
        return self.n_encoded + (len(self.recent_k) if self.recent_k is not None else 0)

    def _store_plain(self, key_states: torch.Tensor, kwargs: dict[str, Any]) -> None:
        """A positional retention's bookkeeping once the step's tokens are appended: positions, eviction, encoding."""
        seen_before = self.seen
        self.seen += key_states.shape[2]
        if self.positions is not None:
            new = torch.arange(seen_before, self.seen, dtype=torch.int32, device=self.device)
            self.positions = torch.cat([self.positions, new.expand(self.positions.shape[0], -1)], dim=1)
        if self._due():
            self._evict(self._view(self._left_padding(kwargs)))
        if not self.codec.lossless:
            self._encode_overflow()
        self.steps += 1

    def _view(self, left_padding: torch.Tensor | None = None, **statistics: Any) -> RetentionView:
        """What the retention sees of this layer now, with the statistics the step computed for it."""
        return RetentionView(
            self.seen, self.stored, self.positions, left_padding, self.layer_idx, self.layers, **statistics
        )

    def _due(self) -> bool:
        return self.retention.due(
            self.stored, self.seen, self.layer_idx, self.layers, self.steps, self.steps - self.last_eviction
        )

    def _end_step(self, transient_bytes: int) -> None:
        if self.store.offloads:
            for part in self._parts():
                part.release()
        resident = sum(self.kv_bytes().values())
        if self.on_step is not None:
            self.on_step(resident - self.resident_bytes, transient_bytes)
        self.resident_bytes, self.transient_bytes = resident, transient_bytes

    def _store_step(self, new_k, new_v, new_positions, attention, mass, compute) -> None:
        """Keep the step's tokens and their score state, encode the residual's overflow, evict if due."""
        batch, heads, n = new_k.shape[:3]
        self.seen += n
        self.recent_k.append(new_k)
        self.recent_v.append(new_v)
        self.positions = torch.cat([self.positions, new_positions[:, None, :].expand(batch, heads, n)], dim=-1)
        if self.mass is not None:
            self.mass = torch.cat([self.mass, self.mass.new_zeros(batch, heads, n)], dim=-1) + mass
        if not self.codec.lossless:  # first, so that the residual left is within the protected window
            self._encode_overflow()
        if self._due():
            view = self._view(attention=attention, mass=self.mass, keys=lambda: self._decoded("k", compute))
            self._evict(view)

    def _decoded(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Every stored K ("k") or V ("v") token, decoded, in `dtype` (fresh memory: callers may keep it)."""
        recent = getattr(self, f"recent_{name}")
        if not getattr(self, f"encoded_{name}"):
            return recent.read().to(dtype)
        return self._with_history(name, recent.read()[:, :, :0], dtype)

    def _with_history(
        self, name: str, new: torch.Tensor, dtype: torch.dtype, for_attention: bool = False
    ) -> torch.Tensor:
        """[K ("k") or V ("v") history decoded | recent | new] in `dtype`, the compute dtype. for_attention: only this
        layer's attention reads it, so it may go into the cache's workspace."""
        encoded, held = getattr(self, f"encoded_{name}"), getattr(self, f"recent_{name}").read()
        n_encoded = len(next(iter(encoded.values()))) if encoded else 0
        shape = (*new.shape[:2], n_encoded + held.shape[2] + new.shape[2], new.shape[3])
        if for_attention and self.workspace is not None and not torch.is_grad_enabled():
            out = self.workspace.take(name, shape, dtype, new.device)
        else:  # autograd may keep what attention read
            out = new.new_empty(shape, dtype=dtype)
        self.codec.decode({key: part.read() for key, part in encoded.items()}, out.narrow(2, 0, n_encoded))
        if held.shape[2]:
            out.narrow(2, n_encoded, held.shape[2]).copy_(held)
        out.narrow(2, n_encoded + held.shape[2], new.shape[2]).copy_(new)
        return out

    def _left_padding(self, kwargs: dict[str, Any]) -> torch.Tensor:
        """Left-padding length per row, from the position ids generate derives from the attention mask: the last
        token of a row with p pad tokens sits at position seen - 1 - p."""
        batch = self.positions.shape[0] if self.positions is not None else 1
        position_ids = kwargs.get("kwargs", kwargs).get("position_ids")
        if position_ids is None or position_ids.shape[0] != batch or not self.retention.needs_positions:
            return torch.zeros(batch, dtype=torch.long, device=self.device)
        return (self.seen - 1 - position_ids[:, -1]).to(self.device)

    def _evict(self, view: RetentionView) -> None:
        stored, n_encoded = self.stored, self.n_encoded
        keep = self.retention.keep(view)
        self.last_eviction = self.steps
        if keep is None:
            return
        keep, live = keep if isinstance(keep, Kept) else (keep, None)
        if self.positions is not None:
            self.positions = take_tokens(self.positions, keep, dim=self.positions.dim() - 1)
            if live is not None:
                self.positions = self.positions.masked_fill(~live, -1)
        if self.mass is not None:
            self.mass = take_tokens(self.mass, keep)
        parts = split_keep(keep, n_encoded, stored) if n_encoded else (None, keep)
        # rows keep different numbers of encoded tokens, or the codec encodes blocks of tokens (`token_block`), which
        # the eviction breaks: decode them back, then evict as one (and encode whole blocks again)
        if parts is None or (n_encoded and self.codec.token_block > 1):
            for name in ("k", "v"):
                decoded = self._decoded(name, self.dtype)
                for part in getattr(self, f"encoded_{name}").values():
                    part.close()
                setattr(self, f"encoded_{name}", {})
                setattr(self, f"recent_{name}", DevicePart(decoded))
            parts = (None, keep)
        self._keep(*parts)
        if self.codec.token_block > 1:
            self._encode_overflow()

    def _encode_overflow(self) -> None:
        overflow = self.codec.encoded_tokens(len(self.recent_k))
        if overflow <= 0:
            return
        self._append_encoded(self.recent_k.read()[:, :, :overflow], self.recent_v.read()[:, :, :overflow])
        for recent in (self.recent_k, self.recent_v):
            recent.keep(slice(overflow, len(recent)))

    def _append_encoded(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        for name, packed in zip(("k", "v"), self.codec.encode_pair(keys, values)):
            parts = getattr(self, f"encoded_{name}")
            for key, tensor in packed.items():
                if key not in parts:
                    parts[key] = self.store.part(no_tokens(tensor))
                parts[key].append(tensor)

    def _keep(self, keep_encoded: slice | torch.Tensor | None, keep_recent: slice | torch.Tensor) -> None:
        for part in self._parts():
            part.keep(keep_recent if part in (self.recent_k, self.recent_v) else keep_encoded)

    def _parts(self) -> list[Part]:
        held = [*self.encoded_k.values(), *self.encoded_v.values(), self.recent_k, self.recent_v]
        return [part for part in held if part is not None]

    def prefetch(self) -> None:
        for part in self._parts():
            part.prefetch()

    def kv_bytes(self) -> dict[str, int]:
        """Bytes this layer holds, per tier: encoded payload, scales, residual buffers and positions, counted by the
        storage the tensors keep alive (so a view pinning evicted tokens counts them)."""
        state = [t for t in (self.positions, self.mass) if t is not None]
        bookkeeping = {DEVICE_MEMORY: sum(t.untyped_storage().nbytes() for t in state)} if state else {}
        return merge_bytes(bookkeeping, *(part.nbytes() for part in self._parts()))

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if not self.is_initialized:
            return
        for part in self._parts():
            part.map(fn)
            part.release()
        if self.positions is not None:
            self.positions = fn(self.positions)
        if self.mass is not None:
            self.mass = fn(self.mass)

    def close(self) -> None:
        for part in self._parts():
            part.close()

    def saved_state(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """CPU copies of this layer's tensors as stored (encoded parts `encoded_k.<name>`, model-dtype tokens
        `recent_k`, `positions`, score state `mass`; and the same for V) and its counters: what `load_saved` rebuilds
        it from. An offloaded part is read one at a time and released at once: saving a parked cache never holds
        its KV on the device."""
        tensors = {}

        def copy(name: str, part: Part) -> None:
            tensors[name] = part.read().detach().to("cpu", copy=True).contiguous()  # the staging buffer is reused
            if self.store.offloads:
                part.release()

        for name in ("k", "v"):
            copy(f"recent_{name}", getattr(self, f"recent_{name}"))
            for key, part in getattr(self, f"encoded_{name}").items():
                copy(f"encoded_{name}.{key}", part)
        for name, state in (("positions", self.positions), ("mass", self.mass)):
            if state is not None:
                tensors[name] = state.detach().to("cpu", copy=True).contiguous()
        return tensors, {"seen": self.seen, "steps": self.steps, "last_eviction": self.last_eviction}

    def load_saved(self, tensors: dict[str, torch.Tensor], counters: dict[str, int]) -> None:
        """Rebuild an empty layer from `saved_state`'s tensors (on this layer's device) and counters: every part
        made by this layer's store and filled as stored, nothing decoded or encoded."""
        self.lazy_initialization(no_tokens(tensors["recent_k"]), no_tokens(tensors["recent_v"]))
        for name in ("k", "v"):
            getattr(self, f"recent_{name}").append(tensors[f"recent_{name}"])
            parts = getattr(self, f"encoded_{name}")
            for key, tensor in tensors.items():
                if key.startswith(f"encoded_{name}."):
                    part = parts[key.removeprefix(f"encoded_{name}.")] = self.store.part(no_tokens(tensor))
                    part.append(tensor)
        if self.positions is not None:
            self.positions = tensors["positions"]
        if self.mass is not None:
            self.mass = tensors["mass"]
        self.seen, self.steps, self.last_eviction = counters["seen"], counters["steps"], counters["last_eviction"]
        self._end_step(0)
