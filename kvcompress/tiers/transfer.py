"""Moving tokens between the compute device and host memory.

`HostMemory` hands out host buffers and counts what is in use (the leak check reads it). On CUDA they are pinned:
from a CuPy pinned memory pool (large blocks, reused across caches), or torch's pinned allocator where CuPy is
missing. An `Engine` copies between device and host: on CUDA on one dedicated non-blocking stream (a CuPy stream
wrapped for torch by `torch.cuda.ExternalStream`), ordered by events, with no host synchronization except where
the host itself touches a buffer; on the CPU by plain copies, so the same tier code runs (and is tested) without a
GPU.
"""

from __future__ import annotations

import mmap
import threading
import time
import weakref
from typing import Callable

import numpy as np
import torch

PAGE = mmap.PAGESIZE


class HostMemory:
    """Process-wide count of the host buffers tiers hold, by kind."""

    _lock = threading.Lock()
    in_use: dict[str, int] = {"pinned": 0, "pageable": 0}

    @classmethod
    def _track(cls, tensor: torch.Tensor, kind: str, nbytes: int) -> torch.Tensor:
        with cls._lock:
            cls.in_use[kind] += nbytes
        weakref.finalize(tensor, cls._untrack, kind, nbytes)
        return tensor

    @classmethod
    def _untrack(cls, kind: str, nbytes: int) -> None:
        with cls._lock:
            cls.in_use[kind] -= nbytes

    @classmethod
    def bytes_in_use(cls) -> int:
        return sum(cls.in_use.values())

    @classmethod
    def pageable(cls, nbytes: int) -> torch.Tensor:
        """Page-aligned host bytes (O_DIRECT needs aligned buffers)."""
        size = max(PAGE, -(-nbytes // PAGE) * PAGE)
        return cls._track(torch.frombuffer(mmap.mmap(-1, size), dtype=torch.uint8)[:nbytes], "pageable", size)

    @classmethod
    def pinned(cls, nbytes: int, use_cupy: bool) -> torch.Tensor:
        size = max(PAGE, -(-nbytes // PAGE) * PAGE)
        try:
            if use_cupy:
                memory = _cupy_pinned_pool().malloc(size)  # freed back to the pool when the array dies
                tensor = torch.from_numpy(np.ndarray((size,), dtype=np.uint8, buffer=memory))
            else:
                tensor = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        except Exception as error:  # cudaErrorMemoryAllocation and friends surface under several types
            raise MemoryError(f"could not allocate {size:,} bytes of pinned host memory: {error}") from error
        return cls._track(tensor[:nbytes], "pinned", size)


_POOL = None


def _cupy_pinned_pool():
    global _POOL
    if _POOL is None:
        import cupy

        _POOL = cupy.cuda.PinnedMemoryPool()
    return _POOL


class Fetch:
    """A copy to the device in flight; `wait()` makes the current stream wait for it and returns the tensor."""

    def __init__(self, tensor: torch.Tensor, event=None, stats: TransferStats | None = None):
        self.tensor, self.event, self.stats = tensor, event, stats

    def wait(self) -> torch.Tensor:
        if self.event is not None:
            torch.cuda.current_stream(self.tensor.device).wait_event(self.event)
        return self.tensor

    def release(self) -> None:
        """The step no longer reads the tensor (buffers it came through may be reused)."""


class TransferStats:
    """Bytes moved and seconds spent, per direction; `stall_s` is host time spent waiting for data."""

    def __init__(self):
        self.counts = {"h2d_bytes": 0, "d2h_bytes": 0, "disk_read_bytes": 0, "disk_write_bytes": 0,
                       "transfer_s": 0.0, "disk_s": 0.0, "stall_s": 0.0}
        self._timed: list = []  # CUDA (start, end) event pairs not read yet
        self._lock = threading.Lock()

    def add(self, **counts: float) -> None:
        with self._lock:
            for key, value in counts.items():
                self.counts[key] += value

    def timed(self, start, end) -> None:
        self._timed.append((start, end))
        if len(self._timed) > 4096:  # read the finished pairs so the list stays short on long runs
            done = 0
            while done < len(self._timed) and self._timed[done][1].query():
                done += 1
            self._collect(self._timed[:done])
            del self._timed[:done]

    def _collect(self, pairs) -> None:
        self.add(transfer_s=sum(start.elapsed_time(end) for start, end in pairs) / 1e3)

    def snapshot(self) -> dict[str, float]:
        if self._timed:
            self._timed[-1][1].synchronize()
            self._collect(self._timed)
            self._timed = []
        return dict(self.counts)


class Engine:
    """Copies between the compute device and host buffers; the CPU implementation copies in place."""

    pinned = False

    def __init__(self, device: torch.device):
        self.device = device
        self.stats = TransferStats()

    def host(self, nbytes: int) -> torch.Tensor:
        return HostMemory.pageable(nbytes)

    def to_host(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        start = time.perf_counter()
        dst.copy_(src)
        self.stats.add(d2h_bytes=src.nbytes, transfer_s=time.perf_counter() - start)

    def to_device(self, src: torch.Tensor) -> Fetch:
        # The host is the device: the host buffer itself is what attention reads, valid until the part releases it.
        self.stats.add(h2d_bytes=src.nbytes)
        return Fetch(src)

    def download(self, src: torch.Tensor) -> torch.Tensor:
        """`src` in host memory now (blocking); the disk tier writes from it."""
        return src

    def synchronize(self) -> None:
        """Wait until every copy issued so far is done (before the host reads or rewrites a host buffer)."""


class CudaEngine(Engine):
    pinned = True

    def __init__(self, device: torch.device, backend: str = "auto"):
        super().__init__(device)
        self.backend = backend
        if backend in ("auto", "cupy"):
            try:
                import cupy

                with cupy.cuda.Device(device.index or 0):
                    self._cupy_stream = cupy.cuda.Stream(non_blocking=True)
                self.stream = torch.cuda.ExternalStream(self._cupy_stream.ptr, device=device)
                self.backend = "cupy"
            except Exception:
                if backend == "cupy":
                    raise
        if self.backend != "cupy":
            self.stream = torch.cuda.Stream(device=device)
            self.backend = "torch"

    def host(self, nbytes: int) -> torch.Tensor:
        return HostMemory.pinned(nbytes, self.backend == "cupy")

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, device_tensor: torch.Tensor):
        compute = torch.cuda.current_stream(self.device)
        # The copy stream waits for the compute stream: `src` may still be being written there, and `dst` may reuse
        # memory that queued kernels still read. A stream-side wait: the host does not block.
        self.stream.wait_stream(compute)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            start.record(self.stream)
            dst.copy_(src, non_blocking=True)
            end.record(self.stream)
        device_tensor.record_stream(self.stream)  # not reused by the allocator before the copy is done
        self.stats.timed(start, end)
        return end

    def to_host(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self._copy(dst, src, src)
        self.stats.add(d2h_bytes=src.nbytes)

    def to_device(self, src: torch.Tensor) -> Fetch:
        out = torch.empty(src.shape, dtype=src.dtype, device=self.device)
        event = self._copy(out, src, out)
        self.stats.add(h2d_bytes=src.nbytes)
        return Fetch(out, event)

    def download(self, src: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        host = src.to("cpu")  # blocking, into pageable memory: the disk thread writes from it
        self.stats.add(d2h_bytes=src.nbytes, stall_s=time.perf_counter() - start)
        return host

    def synchronize(self) -> None:
        start = time.perf_counter()
        self.stream.synchronize()
        self.stats.add(stall_s=time.perf_counter() - start)


def engine_for(device: torch.device, backend: str = "auto") -> Engine:
    return CudaEngine(device, backend) if device.type == "cuda" else Engine(device)


def timed_wait(stats: TransferStats, wait: Callable[[], torch.Tensor]) -> torch.Tensor:
    start = time.perf_counter()
    result = wait()
    stats.add(stall_s=time.perf_counter() - start)
    return result
