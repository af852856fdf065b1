"""What the host and disk tiers share: placement policies over a token-major row store.

Off-device tokens are kept token-major ([tokens, batch, heads, width]) so that appending a decode step's token is one
contiguous copy and reading a layer back is one contiguous copy; the device view is a permute. Policies:

- `layers`: a layer's whole KV lives off the device; the cache prefetches layer l+1 while layer l computes
  (FlexGen; HF's offloaded cache) and the device holds at most two layers' history at a time.
- `cold`: the first `sinks` and the last `window` tokens of each layer stay on the device, the middle lives off the
  device and is brought back for every step (prefetched one layer ahead).

Only new tokens are written off the device (one token per layer per decode step); evicting from the front moves an
offset; an eviction the rows cannot express as an offset (per-row indices) rewrites the part from its device copy.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .base import DevicePart, Part, Store, Tier, merge_bytes, no_tokens, take_tokens
from .transfer import Engine, Fetch, TransferStats, engine_for

POLICIES = ("layers", "cold")


class Rows:
    """Token-major rows of one part off the device: tokens [0, len) of what the part stores."""

    def __init__(self, store: OffloadStore, row_shape: torch.Size, dtype: torch.dtype):
        self.store, self.row_shape, self.dtype = store, row_shape, dtype
        self.row_bytes = row_shape.numel() * dtype.itemsize

    def __len__(self) -> int:
        raise NotImplementedError

    def write(self, rows: torch.Tensor) -> None:
        """Append rows [t, *row_shape] from the compute device."""
        raise NotImplementedError

    def fetch(self) -> Fetch:
        """Start copying every row to the compute device."""
        raise NotImplementedError

    def drop_front(self, count: int) -> None:
        raise NotImplementedError

    def clear(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.clear()

    def nbytes(self) -> dict[str, int]:
        raise NotImplementedError


class OffloadPart(Part):
    """A part whose tokens all live off the device; `read()` brings them back for one step."""

    def __init__(self, store: OffloadStore, template: torch.Tensor):
        self.store, self.template = store, template
        self.rows: Rows | None = None
        self._device: torch.Tensor | None = None  # the whole sequence on the device, while a step uses it
        self._pending: Fetch | None = None
        self._fetch: Fetch | None = None  # what `_device` came through, released with it

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else 0

    def read(self) -> torch.Tensor:
        if self._device is None:
            if not len(self):
                return self.template
            self._fetch, self._pending = self._pending or self.rows.fetch(), None
            self._device = self._fetch.wait().permute(1, 2, 0, 3)
        return self._device

    def prefetch(self) -> None:
        if self._device is None and self._pending is None and len(self):
            self._pending = self.rows.fetch()

    def append(self, x: torch.Tensor) -> None:
        if not x.shape[2]:
            return
        if self.rows is None:
            self.rows = self.store.rows(x.shape[:2] + x.shape[3:], x.dtype)
        # a device copy read earlier this step is now short of `x`: a later read fetches again (the copy stream
        # orders it after this write); the fetch it came through stays held until release
        self._device = None
        self.rows.write(x.permute(2, 0, 1, 3).contiguous())

    def extend(self, x: torch.Tensor) -> torch.Tensor:
        full = super().extend(x)
        self._device = full
        return full

    def keep(self, keep: slice | torch.Tensor) -> None:
        if isinstance(keep, slice) and keep.stop == len(self):
            if self._device is not None:
                self._device = self._device[:, :, keep]
            self.rows.drop_front(keep.start)
        else:
            self.replace(take_tokens(self.read(), keep))

    def replace(self, x: torch.Tensor) -> None:
        # `x` may be a view of what the last fetch brought (a staging buffer on the CPU): that fetch is released with
        # the step, not here
        self._pending = self._device = None
        if self.rows is not None:
            self.rows.clear()
        self.template = no_tokens(x)
        self.append(x)
        self._device = x

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.replace(fn(self.read()))

    def release(self) -> None:
        self._device = None
        if self._fetch is not None:
            self._fetch.release()
            self._fetch = None

    def nbytes(self) -> dict[str, int]:
        return self.rows.nbytes() if self.rows is not None else {}

    def close(self) -> None:
        self.release()
        self._pending = None
        if self.rows is not None:
            self.rows.close()
            self.rows = None


class ColdPart(Part):
    """The first `sinks` and last `window` tokens on the device, the middle off it."""

    def __init__(self, store: OffloadStore, template: torch.Tensor, sinks: int, window: int):
        self.sinks, self.window = sinks, window
        self.head, self.tail = DevicePart(template), DevicePart(template)
        self.middle = OffloadPart(store, template)

    def __len__(self) -> int:
        return len(self.head) + len(self.middle) + len(self.tail)

    def read(self) -> torch.Tensor:
        return torch.cat([self.head.read(), self.middle.read(), self.tail.read()], dim=2)

    def append(self, x: torch.Tensor) -> None:
        self.tail.append(x)
        self._spill(self.head, self.sinks - len(self.head))
        self._spill(self.middle, len(self.tail) - self.window)

    def _spill(self, target: Part, count: int) -> None:
        """Move the oldest `count` tail tokens to `target`."""
        count = min(count, len(self.tail))
        if count > 0:
            target.append(self.tail.read()[:, :, :count])
            self.tail.keep(slice(count, len(self.tail)))

    def keep(self, keep: slice | torch.Tensor) -> None:
        self.replace(take_tokens(self.read(), keep))

    def replace(self, x: torch.Tensor) -> None:
        template = no_tokens(x)
        self.middle.replace(template)
        self.head, self.tail = DevicePart(template), DevicePart(template)
        self.append(x)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.replace(fn(self.read()))

    def prefetch(self) -> None:
        self.middle.prefetch()

    def release(self) -> None:
        self.middle.release()

    def nbytes(self) -> dict[str, int]:
        return merge_bytes(self.head.nbytes(), self.tail.nbytes(), self.middle.nbytes())

    def close(self) -> None:
        self.middle.close()


class OffloadStore(Store):
    offloads = True

    def __init__(self, tier: OffloadTier):
        super().__init__(tier)
        self.engine: Engine | None = None
        self.transfer = TransferStats()  # shared by the engine's copies and the disk tier's I/O thread

    def part(self, template: torch.Tensor) -> Part:
        if self.engine is None:
            self.engine = self.open_engine(template.device)
        if self.tier.policy == "cold":
            return ColdPart(self, template, self.tier.sinks, self.tier.window)
        return OffloadPart(self, template)

    def open_engine(self, device: torch.device) -> Engine:
        return engine_for(device, self.transfer, getattr(self.tier, "engine", "auto"))

    def rows(self, row_shape: torch.Size, dtype: torch.dtype) -> Rows:
        raise NotImplementedError

    def stats(self) -> dict[str, float]:
        return self.transfer.snapshot()


@dataclass(frozen=True)
class OffloadTier(Tier):
    """policy: `layers` (whole layers off the device, next layer prefetched) or `cold` (first `sinks` and last
    `window` tokens on the device, the middle off it)."""

    policy: str = "layers"
    sinks: int = 4
    window: int = 1024

    @property
    def device_tokens(self) -> int:
        # `layers` holds at most two layers' history on the device, and only while they compute
        return self.sinks + self.window if self.policy == "cold" else 0

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"{self.name}:policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.sinks < 0 or self.window < 0:
            raise ValueError(f"{self.name}:sinks and {self.name}:window must be >= 0, got {self.sinks}, {self.window}")


def warn_cpu_host(device: torch.device) -> None:
    if device.type == "cpu":
        warnings.warn(
            "host tier on a CPU model: the compute device is host memory, so host offload saves no memory "
            "(it runs the same code as on a GPU, which is what it is useful for here); use the disk tier to save RAM",
            stacklevel=4,
        )
