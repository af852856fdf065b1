"""Tier: where stored tokens live.

A tier is a frozen config. `tier.open(...)` gives one cache its `Store` (what its layers share: streams, files,
pinned blocks), and the store makes `Part`s: one growing token sequence [batch, heads, tokens, width] each (a layer's
K, V, or one tensor of their encoded form). The layer only appends, keeps, reads and maps parts, so retention and
codecs never see where the tokens are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..registry import Registry

# A view that pins more than this fraction of dead bytes in its storage is copied out, so evicted tokens are freed
# now rather than at the next append (and so resident bytes equal what the layer holds).
_MAX_DEAD_FRACTION = 1 / 64
# The memory of the compute device (HBM on a GPU): the `memory` of a tier that keeps every token there, and the key
# of the `nbytes()` counts held in it; what the core compares a tier's `memory` with, never a member's name.
DEVICE_MEMORY = "device"


def own(t: torch.Tensor) -> torch.Tensor:
    return t.clone() if t.untyped_storage().nbytes() - t.nbytes > t.nbytes * _MAX_DEAD_FRACTION else t


def take_tokens(t: torch.Tensor, keep: slice | torch.Tensor, dim: int = 2) -> torch.Tensor:
    """Keep tokens along `dim` by a slice (same in every row), per-row indices [batch, kept] or, for dim 2, per-(row,
    head) indices [batch, heads, kept]."""
    if isinstance(keep, slice):
        return own(t[(slice(None),) * dim + (keep,)])
    index = keep[:, None, :] if dim == 2 and keep.dim() == 2 else keep
    index = index.view(index.shape + (1,) * (t.dim() - index.dim()))
    return t.gather(dim, index.expand(*t.shape[:dim], index.shape[dim], *t.shape[dim + 1 :]))


def no_tokens(x: torch.Tensor) -> torch.Tensor:
    """An empty [batch, heads, 0, width] tensor like `x` that shares no storage with it (so it pins nothing)."""
    return x.new_empty(x.shape[:2] + (0,) + x.shape[3:])


def merge_bytes(*counts: dict[str, int]) -> dict[str, int]:
    total: dict[str, int] = {}
    for count in counts:
        for tier, nbytes in count.items():
            total[tier] = total.get(tier, 0) + nbytes
    return total


class Part:
    """One stored token sequence of a layer. `read()` gives it on the compute device, valid until `release()`."""

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self) -> torch.Tensor:
        raise NotImplementedError

    def append(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def extend(self, x: torch.Tensor) -> torch.Tensor:
        """Append `x` and return the whole sequence on the device (what attention sees for a lossless layer)."""
        full = torch.cat([self.read(), x], dim=2)
        self.append(x)
        return full

    def keep(self, keep: slice | torch.Tensor) -> None:
        raise NotImplementedError

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        raise NotImplementedError

    def nbytes(self) -> dict[str, int]:
        raise NotImplementedError

    def prefetch(self) -> None:
        """Start bringing the sequence to the device, so the next `read()` waits less (offloading tiers)."""

    def release(self) -> None:
        """The step is done with what `read()` returned: drop device copies of off-device tokens."""

    def close(self) -> None:
        """Free what the part holds outside the device (pinned blocks, file blocks)."""


class DevicePart(Part):
    """Tokens in one tensor on the compute device. grow == 0: the tensor holds exactly the tokens (a step's append
    concatenates). grow > 0: the tensor is a buffer with room, grown `grow` tokens at a time, so an append writes in
    place and the tokens are its first `len(self)` (a view); the room counts in `nbytes()`, and eviction moves the
    kept tokens to a buffer sized for them, giving the rest back."""

    def __init__(self, template: torch.Tensor, grow: int = 0):
        self.tensor, self.grow, self.length = template, grow, template.shape[2]

    def __len__(self) -> int:
        return self.length

    def read(self) -> torch.Tensor:
        return self.tensor if self.tensor.shape[2] == self.length else self.tensor[:, :, : self.length]

    def append(self, x: torch.Tensor) -> None:
        if not self.grow:
            self.tensor = torch.cat([self.tensor, x], dim=2)
        else:
            end = self.length + x.shape[2]
            if end > self.tensor.shape[2]:
                self._move(self.read(), end)
            self.tensor[:, :, self.length : end] = x
        self.length += x.shape[2]

    def extend(self, x: torch.Tensor) -> torch.Tensor:
        self.append(x)
        return self.read()

    def keep(self, keep: slice | torch.Tensor) -> None:
        kept = take_tokens(self.read(), keep)
        if not self.grow:
            self.tensor = kept
        else:  # a new buffer, never compacting in place: the step's attention may still read the old one
            self._move(kept, kept.shape[2])
        self.length = kept.shape[2]

    def _move(self, tokens: torch.Tensor, room_for: int) -> None:
        """A new buffer with room for `room_for` tokens, rounded up to `grow`, starting with `tokens`."""
        capacity = -(-room_for // self.grow) * self.grow
        self.tensor = tokens.new_empty(*tokens.shape[:2], capacity, *tokens.shape[3:])
        self.tensor[:, :, : tokens.shape[2]] = tokens

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.tensor = fn(self.read())
        self.length = self.tensor.shape[2]

    def nbytes(self) -> dict[str, int]:
        return {DEVICE_MEMORY: self.tensor.untyped_storage().nbytes()}


class Store:
    """What one cache's layers share on a tier; makes their parts."""

    offloads = False  # whether parts live off the device (then layers prefetch and release them)

    def __init__(self, tier: Tier):
        self.tier = tier
        self.grow = (
            0  # device parts grow by this many tokens at a time (0: exactly, by concatenation); set by the cache
        )

    def part(self, template: torch.Tensor) -> Part:
        """A new empty part for tokens shaped like `template` ([batch, heads, 0, width] on the compute device)."""
        return DevicePart(template, self.grow)

    def nbytes(self) -> dict[str, int]:
        """Bytes the store holds besides its parts (staging buffers)."""
        return {}

    def stats(self) -> dict[str, float]:
        """Transfer counters since the store opened (bytes moved per direction, seconds spent, seconds stalled)."""
        return {}

    def close(self) -> None:
        """Release files and pinned blocks; the store is unusable afterwards."""


@dataclass(frozen=True)
class Tier:
    name = "base"
    # What keeping tokens on this tier means for planning; the simulator reads these, never the tier's name.
    # memory: where its bytes live (the key of the kv_bytes() counts that hold them); link: what a decode step reads
    # them back over; shortage: the outcome named when that memory runs out; capacity_setting and link_setting: the
    # SimConfig fields giving a simulated machine's room on that memory and the link's bytes/s.
    memory = DEVICE_MEMORY
    link = ""
    shortage = "memory-bound"
    capacity_setting = ""
    link_setting = ""

    @property
    def device_tokens(self) -> int | None:
        """Tokens per sequence and layer kept on the compute device between steps (None: all of them)."""
        return None

    def open(self, planned_bytes: int = 0, offload_dir: str | None = None) -> Store:
        """The store of one cache. `planned_bytes` is the most KV the cache expects to hold (disk checks room);
        `offload_dir` where a tier that writes files puts them (the others write none and ignore it)."""
        return Store(self)


TIERS: Registry[Tier] = Registry("tier")
