from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import TIERS
from .offload import OffloadStore, OffloadTier, Rows, warn_cpu_host
from .transfer import Engine, Fetch

ENGINES = ("auto", "cupy", "torch")
_GROWTH = 4  # grow capacity by a quarter: host bytes stay within 1.25x of what is stored


class HostRows(Rows):
    """Rows in one host buffer (pinned on CUDA) with room to grow; eviction from the front moves an offset."""

    def __init__(self, store: OffloadStore, row_shape: torch.Size, dtype: torch.dtype):
        super().__init__(store, row_shape, dtype)
        self.buffer: torch.Tensor | None = None  # the raw bytes (what HostMemory tracks)
        self.rows: torch.Tensor | None = None  # the same bytes as [capacity, *row_shape]
        self.start = self.length = 0

    def __len__(self) -> int:
        return self.length

    def _reserve(self, count: int) -> None:
        needed = self.length + count
        if self.rows is not None and self.start + needed <= self.rows.shape[0]:
            return
        capacity = needed + max(needed // _GROWTH, 16)
        engine = self.store.engine
        buffer = engine.host(capacity * self.row_bytes)
        rows = buffer.view(self.dtype).view(capacity, *self.row_shape)
        if self.length:
            engine.synchronize()  # copies still landing in the old buffer finish before the host moves it
            rows[: self.length].copy_(self.rows[self.start : self.start + self.length])
        self.buffer, self.rows, self.start = buffer, rows, 0

    def write(self, rows: torch.Tensor) -> None:
        self._reserve(rows.shape[0])
        end = self.start + self.length
        self.store.engine.to_host(rows, self.rows[end : end + rows.shape[0]])
        self.length += rows.shape[0]

    def fetch(self) -> Fetch:
        return self.store.engine.to_device(self.rows[self.start : self.start + self.length])

    def drop_front(self, count: int) -> None:
        self.start += count
        self.length -= count

    def clear(self) -> None:
        self.start = self.length = 0

    def close(self) -> None:
        self.clear()
        self.buffer = self.rows = None

    def nbytes(self) -> dict[str, int]:
        return {"host": self.buffer.numel()} if self.buffer is not None else {}


class HostStore(OffloadStore):
    def open_engine(self, device: torch.device) -> Engine:
        warn_cpu_host(device)
        return super().open_engine(device)

    def rows(self, row_shape: torch.Size, dtype: torch.dtype) -> Rows:
        return HostRows(self, row_shape, dtype)


@TIERS.register("host")
@dataclass(frozen=True)
class HostTier(OffloadTier):
    """Host memory, pinned on CUDA (CuPy pinned pool and stream when `engine` is auto or cupy, torch's otherwise).
    On a CPU model it runs the same code but saves nothing (a warning says so)."""

    engine: str = "auto"
    memory, link, shortage = "host", "PCIe", "host-memory-bound"
    capacity_setting, link_setting = "host_bytes", "pcie_bytes_per_s"

    def __post_init__(self):
        super().__post_init__()
        if self.engine not in ENGINES:
            raise ValueError(f"host:engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")

    def open(self, planned_bytes: int = 0, offload_dir: str | None = None) -> HostStore:
        return HostStore(self)
