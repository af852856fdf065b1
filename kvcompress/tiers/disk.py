"""The disk tier: one file per cache (session), fixed-size blocks, aligned I/O, a read-ahead thread.

Each part's rows go to a host tail block; a full block is written by the I/O thread (O_DIRECT where the file
system allows, buffered otherwise) with its CRC32 kept in memory, and read back, checked, by the same thread when
the layer is prefetched. Only the tail block and the staging of the layer in use (and of the next) stay in RAM.
The file is created fresh (O_EXCL) under a random session id with a checksummed header, and removed on `close()`,
on garbage collection and at interpreter exit; no run ever opens a file it did not create.
"""

from __future__ import annotations

import math
import os
import shutil
import struct
import tempfile
import time
import uuid
import weakref
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import TIERS
from .offload import OffloadStore, OffloadTier, Rows
from .transfer import PAGE, Fetch, HostMemory, TransferStats, timed_wait

BLOCK_BYTES = 64 * 1024
MAX_PENDING_WRITES = 64
EXTENT_BLOCKS = 64  # blocks a part reserves at once, so its blocks sit side by side and read back in long runs
MAX_READ_BLOCKS = 128  # at most 8 MiB per read call
MAGIC = b"KVCOMPRESS-KV"
HEADER = struct.Struct("<13sH16sQd")  # magic, format version, session id, pid, creation time; then its CRC32


_CHECKSUMS = ThreadPoolExecutor(1, thread_name_prefix="kvcompress-crc")  # zlib releases the GIL: runs beside reads


class CorruptOffloadError(IOError):
    """An offload file returned fewer bytes than written or bytes whose checksum differs."""


class DiskFile:
    """One session's offload file and the thread that does its I/O, in submission order."""

    def __init__(self, directory: str, planned_bytes: int, stats: TransferStats):
        path = Path(directory)
        if not path.is_dir():
            raise ValueError(f"offload_dir {directory!r} does not exist or is not a directory; create it first")
        self.session = uuid.uuid4()
        self.path = path / f"kvcompress-{os.getpid()}-{self.session.hex}.kv"
        self.stats = stats
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as error:
            raise ValueError(f"cannot create an offload file in offload_dir {directory!r}: {error.strerror}") from None
        free = shutil.disk_usage(path).free
        if planned_bytes > free:
            os.close(self.fd)
            self.path.unlink()
            raise ValueError(
                f"offload_dir {directory!r} has {free:,} bytes free but the planned KV needs {planned_bytes:,} bytes; "
                "free space, choose another directory, or plan fewer tokens (make_cache(..., max_tokens=N))"
            )
        self.direct_fd = self._open_direct()
        self.io = ThreadPoolExecutor(1, thread_name_prefix="kvcompress-disk")
        self.end = PAGE  # block offsets start after the header page
        self._free: dict[int, list[int]] = {}
        self._pending: deque[Future] = deque()
        header = HEADER.pack(MAGIC, 1, self.session.bytes, os.getpid(), time.time())
        page = HostMemory.pageable(PAGE)
        page[: HEADER.size + 4] = torch.tensor(list(header + struct.pack("<I", zlib.crc32(header))), dtype=torch.uint8)
        try:
            self._write_header(page)
        except OSError as error:
            _remove(self.fd, self.direct_fd, str(self.path), self.io)
            raise ValueError(f"cannot write an offload file in offload_dir {directory!r}: {error.strerror}") from None
        self._remove = weakref.finalize(self, _remove, self.fd, self.direct_fd, str(self.path), self.io)

    def _write_header(self, page: torch.Tensor) -> None:
        if self.direct_fd is not None:
            try:
                self.io.submit(self._write_job, self.direct_fd, page, 0).result()
                return
            except OSError:  # the file system took O_DIRECT at open but refuses its I/O
                os.close(self.direct_fd)
                self.direct_fd = None
        self.io.submit(self._write_job, self.fd, page, 0).result()

    def _open_direct(self) -> int | None:
        if not hasattr(os, "O_DIRECT"):
            return None
        try:
            return os.open(self.path, os.O_RDWR | os.O_DIRECT)
        except OSError:  # tmpfs and some others refuse O_DIRECT: buffered I/O then
            return None

    def check_header(self) -> uuid.UUID:
        """The session id the file's header names, after checking magic and checksum."""
        raw = os.pread(self.fd, HEADER.size + 4, 0)
        if len(raw) != HEADER.size + 4 or struct.unpack("<I", raw[-4:])[0] != zlib.crc32(raw[:-4]):
            raise CorruptOffloadError(f"offload file {self.path} has a damaged header")
        magic, _, session, _, _ = HEADER.unpack(raw[:-4])
        if magic != MAGIC or session != self.session.bytes:
            raise CorruptOffloadError(f"offload file {self.path} belongs to another session")
        return uuid.UUID(bytes=session)

    def alloc(self, size: int) -> int:
        """A freed block of `size` bytes, or None."""
        free = self._free.get(size)
        return free.pop() if free else None

    def reserve(self, size: int) -> int:
        """A new extent of `size` bytes at the end of the file."""
        offset, self.end = self.end, self.end + size
        return offset

    def free(self, offset: int, size: int) -> None:
        self._free.setdefault(size, []).append(offset)

    def _write_job(self, fd: int, buffer: torch.Tensor, offset: int) -> int:
        start, view = time.perf_counter(), memoryview(buffer.numpy())
        written = os.pwrite(fd, view, offset)
        if written != len(view):
            raise OSError(f"short write: {written} of {len(view)} bytes at offset {offset} of {self.path}")
        self.stats.add(disk_write_bytes=written, disk_s=time.perf_counter() - start)
        return zlib.crc32(view)

    def write(self, buffer: torch.Tensor, offset: int, aligned: bool) -> Future:
        """Write a block (the thread owns `buffer` from now on); the future gives its CRC32. At most
        MAX_PENDING_WRITES blocks wait in RAM: a long prefill waits for the disk rather than piling up."""
        while len(self._pending) >= MAX_PENDING_WRITES:
            self._pending.popleft().result()
        fd = self.direct_fd if aligned and self.direct_fd is not None else self.fd
        future = self.io.submit(self._write_job, fd, buffer, offset)
        self._pending.append(future)
        return future

    def read(self, blocks: list[tuple[int, Future]], size: int, into: torch.Tensor, aligned: bool) -> Future:
        """Read blocks back to back into `into`, checking each one's length and checksum."""
        fd = self.direct_fd if aligned and self.direct_fd is not None else self.fd

        def job() -> None:
            start, view = time.perf_counter(), memoryview(into.numpy())
            first, checks = 0, []
            while first < len(blocks):  # one read per run of adjacent blocks (extents keep a part's blocks adjacent)
                last = first + 1
                while (
                    last < len(blocks)
                    and last - first < MAX_READ_BLOCKS
                    and blocks[last][0] == blocks[last - 1][0] + size
                ):
                    last += 1
                run, offset = view[first * size : last * size], blocks[first][0]
                got = os.preadv(fd, [run], offset)
                if got != len(run):
                    raise CorruptOffloadError(
                        f"short read: {got} of {len(run)} bytes at offset {offset} of {self.path}"
                    )
                checks.append(
                    _CHECKSUMS.submit(self._check, view, blocks, first, last, size)
                )  # while the next run reads
                first = last
            for check in checks:
                check.result()
            self.stats.add(disk_read_bytes=len(blocks) * size, disk_s=time.perf_counter() - start)

        return self.io.submit(job)

    def _check(self, view: memoryview, blocks: list[tuple[int, Future]], first: int, last: int, size: int) -> None:
        for i in range(first, last):
            if zlib.crc32(view[i * size : (i + 1) * size]) != blocks[i][1].result():
                raise CorruptOffloadError(f"checksum mismatch in the block at offset {blocks[i][0]} of {self.path}")

    def close(self) -> None:
        self._remove()


def _remove(fd: int, direct_fd: int | None, path: str, io: ThreadPoolExecutor) -> None:
    io.shutdown(wait=True)
    for descriptor in (fd, direct_fd):
        if descriptor is not None:
            os.close(descriptor)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class StagingPool:
    """Host buffers that layers are read into, reused across steps (a few layers' worth, not the whole cache)."""

    KEEP = 4

    def __init__(self):
        self.free: list[torch.Tensor] = []

    def take(self, nbytes: int) -> torch.Tensor:
        fits = [i for i, buffer in enumerate(self.free) if buffer.numel() >= nbytes]
        if fits:
            return self.free.pop(min(fits, key=lambda i: self.free[i].numel()))
        return HostMemory.pageable(-(-nbytes * 5 // 4 // (1 << 20)) * (1 << 20))

    def give(self, buffer: torch.Tensor) -> None:
        self.free.append(buffer)
        if len(self.free) > self.KEEP:
            self.free.remove(min(self.free, key=lambda b: b.numel()))

    def nbytes(self) -> int:
        return sum(buffer.numel() for buffer in self.free)


class DiskFetch(Fetch):
    def __init__(self, rows: DiskRows, future: Future, staging: torch.Tensor, start: int, count: int):
        self.rows, self.future, self.staging, self.start, self.count = rows, future, staging, start, count

    def wait(self) -> torch.Tensor:
        store = self.rows.store
        timed_wait(store.transfer, self.future.result)
        typed = self.rows._typed(self.staging)
        return store.engine.to_device(typed[self.start : self.start + self.count]).wait()

    def release(self) -> None:
        self.rows.store.staging.give(self.staging)


class DiskRows(Rows):
    """Full blocks on disk plus one tail block in host memory; `start` rows of the first block are evicted."""

    def __init__(self, store: DiskStore, row_shape: torch.Size, dtype: torch.dtype):
        super().__init__(store, row_shape, dtype)
        unit = math.lcm(self.row_bytes, PAGE)
        # Blocks hold whole rows with no padding, so blocks read back to back are the rows themselves; page-sized
        # multiples allow O_DIRECT, else (rows of awkward sizes) buffered I/O.
        self.aligned = store.file.direct_fd is not None and unit <= 16 * BLOCK_BYTES
        if self.aligned:
            self.block_bytes = unit * max(1, BLOCK_BYTES // unit)
            self.block_rows = self.block_bytes // self.row_bytes
        else:
            self.block_rows = max(1, BLOCK_BYTES // self.row_bytes)
            self.block_bytes = self.block_rows * self.row_bytes
        self.blocks: list[tuple[int, Future]] = []
        self._extent: list[int] = []  # offsets of free blocks this part holds, next one last
        self.tail: torch.Tensor | None = None
        self.tail_rows = self.start = 0

    def __len__(self) -> int:
        return len(self.blocks) * self.block_rows + self.tail_rows - self.start

    def _typed(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer[: buffer.numel() // self.row_bytes * self.row_bytes].view(self.dtype).view(-1, *self.row_shape)

    def write(self, rows: torch.Tensor) -> None:
        rows = self.store.engine.download(rows)
        done = 0
        while done < rows.shape[0]:
            if self.tail is None:
                self.tail = HostMemory.pageable(self.block_bytes)
            count = min(self.block_rows - self.tail_rows, rows.shape[0] - done)
            self._typed(self.tail)[self.tail_rows : self.tail_rows + count] = rows[done : done + count]
            self.tail_rows += count
            done += count
            if self.tail_rows == self.block_rows:
                offset = self._next_block()
                self.blocks.append((offset, self.store.file.write(self.tail, offset, self.aligned)))
                self.tail, self.tail_rows = None, 0

    def _next_block(self) -> int:
        if not self._extent:
            reused = self.store.file.alloc(self.block_bytes)  # a block a closed part gave back
            if reused is not None:
                return reused
            start = self.store.file.reserve(EXTENT_BLOCKS * self.block_bytes)
            self._extent = [start + i * self.block_bytes for i in range(EXTENT_BLOCKS - 1, -1, -1)]
        return self._extent.pop()

    def fetch(self) -> Fetch:
        on_disk = len(self.blocks) * self.block_bytes
        staging = self.store.staging.take(on_disk + self.tail_rows * self.row_bytes)
        if self.tail_rows:
            tail_rows = self._typed(self.tail)[: self.tail_rows]
            self._typed(staging[on_disk:])[: self.tail_rows] = tail_rows
        future = self.store.file.read(list(self.blocks), self.block_bytes, staging[:on_disk], self.aligned)
        return DiskFetch(self, future, staging, self.start, len(self))

    def drop_front(self, count: int) -> None:
        self.start += count
        while self.blocks and self.start >= self.block_rows:
            offset, _ = self.blocks.pop(0)
            self._extent.insert(0, offset)  # reused by this part, after the rest of its extent
            self.start -= self.block_rows
        if not self.blocks and self.start >= self.tail_rows:
            self.start = self.tail_rows = 0

    def clear(self) -> None:
        self._extent = [offset for offset, _ in reversed(self.blocks)] + self._extent
        self.blocks, self.tail_rows, self.start = [], 0, 0

    def close(self) -> None:
        self.clear()
        for offset in self._extent:
            self.store.file.free(offset, self.block_bytes)
        self._extent, self.tail = [], None

    def nbytes(self) -> dict[str, int]:
        counts = {"disk": len(self.blocks) * self.block_bytes}
        if self.tail is not None:
            counts["host"] = self.tail.numel()
        return counts


class DiskStore(OffloadStore):
    def __init__(self, tier: DiskTier, planned_bytes: int, directory: str | None):
        super().__init__(tier)
        self.staging = StagingPool()
        self.file = DiskFile(str(directory or tempfile.gettempdir()), planned_bytes, self.transfer)

    def rows(self, row_shape: torch.Size, dtype: torch.dtype) -> Rows:
        return DiskRows(self, row_shape, dtype)

    def nbytes(self) -> dict[str, int]:
        return {"host": self.staging.nbytes()}

    def close(self) -> None:
        self.staging.free.clear()
        self.file.close()


@TIERS.register("disk")
@dataclass(frozen=True)
class DiskTier(OffloadTier):
    """One file per cache in the cache's `offload_dir` (default: the system temporary directory). Where the file goes
    is a property of the machine, not of the strategy, so it is no strategy parameter."""

    memory, link, shortage = "disk", "disk", "disk-space-bound"
    capacity_setting, link_setting = "disk_bytes", "disk_bytes_per_s"

    def open(self, planned_bytes: int = 0, offload_dir: str | None = None) -> DiskStore:
        return DiskStore(self, planned_bytes, offload_dir)
