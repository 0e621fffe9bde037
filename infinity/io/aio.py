"""AioEngine: reads and writes of torch tensors at any offset through DeepSpeed's aio handle.

Call order of one request (``pread``/``pwrite``; ``read``/``write`` just wait on the future):

1. The caller's thread checks the arguments (contiguous tensor, offset >= 0, supported device)
   and, for a CUDA tensor, records an event on the caller's current stream.
2. One of ``AioConfig.lanes`` worker threads takes the request. Each lane owns its handles
   (one with ``intra_op_parallelism`` threads, one with a single thread for the sub-granule
   remainder) and two pinned bounce buffers of ``bounce_chunk_bytes``.
3. The lane opens the file itself first (regular files only, never through a symbolic link),
   so that a missing path, a link, a directory, a read-only directory, a filesystem without
   O_DIRECT (tmpfs, overlayfs), a read past the end or a full disk (``posix_fallocate``
   reserves the blocks before any write) is an ``StorageIOError`` with errno and numbers,
   never one of DeepSpeed's silent failures (its handle ignores per-block results).
4. Plan: the aligned prefix of a direct-I/O capable CPU buffer (pinned or DeepSpeed-locked,
   4 KiB-aligned address and offset) goes straight to the handle. Everything else (CUDA tensors,
   pageable memory, unaligned heads and tails) streams through the bounce buffers, double-buffered
   so that the disk works on chunk k+1 while chunk k is copied (on the lane's CUDA stream for
   GPU tensors). Unaligned writes read-modify-write their edge blocks; the final partial block of
   a file, which O_DIRECT cannot reach, uses an ordinary pread/pwrite of at most 4095 bytes.
5. Every count DeepSpeed returns is checked; the future resolves to the number of bytes moved.

Concurrent requests may write disjoint ranges of one file, extending it in any order; they must
not write the same 4 KiB block at once (the store's extents are block-aligned and disjoint).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from infinity.config import ALIGNMENT_BYTES as A
from infinity.config import AioConfig
from infinity.errors import ConfigError, StorageIOError
from infinity.io._deepspeed import load_aio
from infinity.io.fsinfo import MEMORY_FS, mount_of
from infinity.io.pinned import PinnedPool

log = logging.getLogger(__name__)


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """A flat ``uint8`` view of a contiguous tensor's storage (any dtype, 0-d included)."""
    if not tensor.is_contiguous():
        raise ConfigError(
            f"tensor of shape {tuple(tensor.shape)} and strides {tensor.stride()} is not "
            "contiguous; pass tensor.contiguous() (reads need a contiguous destination)"
        )
    return tensor.reshape(-1).view(torch.uint8)


_first_write_lock = threading.Lock()
_first_write_done = False


def _first_write_guard(op, write: bool, *args) -> int:
    """Serialise the process's first DeepSpeed write. DeepSpeed 0.19.8 logs a warning once
    (std::call_once) when it builds its first write op, taking the GIL inside; its async_pwrite
    binding keeps the GIL while it runs, so two lanes making their first write at once deadlock
    (one holds the GIL and waits in call_once, the other holds call_once and waits for the GIL;
    the lock inversion noted in the review of deepspeedai/DeepSpeed#8196)."""
    global _first_write_done
    if not write or _first_write_done:
        return op(*args)
    with _first_write_lock:
        if not _first_write_done:
            log.info(
                "writing to NVMe: offloading that rewrites data every step (optimizer states) "
                "can use up a consumer SSD's rated endurance (TBW); prefer datacenter drives"
            )
        rc = op(*args)
        _first_write_done = True
    return rc


@dataclass
class _Request:
    write: bool
    buf: torch.Tensor  # flat uint8
    path: str
    file_offset: int
    ready: object | None  # torch.cuda.Event recorded on the caller's stream


def bounce_bytes(config: AioConfig) -> int:
    """Pinned bytes an AioEngine with ``config`` takes from its pool (two bounce halves a lane):
    what a shared pool must hold on top of its other users' needs."""
    return 2 * config.lanes * config.bounce_chunk_bytes


class _Lane:
    """One worker's handles, bounce buffers and CUDA streams.

    Two slots, each a pair of handles (``intra_op_parallelism`` threads for whole granules, one
    thread for the sub-granule remainder) with its own bounce half: chunk k uses slot k % 2, so
    chunk k+1 is already queued on the disk while chunk k completes and is copied out.
    """

    def __init__(self, engine: AioEngine):
        cfg = engine.config
        aio = load_aio()
        args = (cfg.block_size_bytes, cfg.queue_depth, cfg.single_submit, cfg.overlap_events)
        self.slots = []
        for _ in range(2):
            main = aio.aio_handle(*args, cfg.intra_op_parallelism)
            single = aio.aio_handle(*args, 1) if cfg.intra_op_parallelism > 1 else main
            self.slots.append((main, single))
        self.main = self.slots[0][0]
        self.unit = cfg.chunk_unit_bytes
        self.chunk = cfg.bounce_chunk_bytes
        self.halves = engine._halves.pop()
        self.pending: list[dict[object, int]] = [{}, {}]
        self.streams: dict[int, tuple[torch.cuda.Stream, list]] = {}

    # -- DeepSpeed ops ----------------------------------------------------------------------
    def submit(
        self, write: bool, buf: torch.Tensor, path: str, file_offset: int, slot: int = 0
    ) -> None:
        """Queue an aligned transfer (``buf.numel()`` a multiple of 4 KiB) on a slot's handles."""
        n = buf.numel()
        main_n = n // self.unit * self.unit
        main, single = self.slots[slot]
        pending = self.pending[slot]
        for handle, start, end in ((main, 0, main_n), (single, main_n, n)):
            if end == start:
                continue
            op = handle.async_pwrite if write else handle.async_pread
            rc = _first_write_guard(op, write, buf[start:end], path, file_offset + start)
            if rc != 0:
                raise StorageIOError(
                    path,
                    file_offset + start,
                    end - start,
                    errno.EIO,
                    f"DeepSpeed aio refused the {'write' if write else 'read'} (returned {rc})",
                )
            pending[handle] = pending.get(handle, 0) + 1

    def wait(self, path: str, file_offset: int, nbytes: int, slot: int = 0) -> None:
        pending, self.pending[slot] = self.pending[slot], {}
        for handle, count in pending.items():
            done = handle.wait()
            if done != count:
                raise StorageIOError(
                    path,
                    file_offset,
                    nbytes,
                    errno.EIO,
                    f"DeepSpeed aio completed {done} of {count} submitted ops",
                )

    def drain(self) -> None:
        """After an error: wait for what is in flight so no buffer is reused under the disk."""
        for slot in range(2):
            pending, self.pending[slot] = self.pending[slot], {}
            for handle in pending:
                handle.wait()

    # -- CUDA -------------------------------------------------------------------------------
    def stream_for(self, device: torch.device):
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self.streams:
            with torch.cuda.device(index):
                self.streams[index] = (torch.cuda.Stream(), [None, None])
        return self.streams[index]


class FileGrowth:
    """Writes to one file grow it (fallocate, whole blocks) and cut it back to their exact end,
    both under ``lock``. A cut must never drop bytes of another write: ``floor`` is the
    furthest end of the writes still in flight and of those that finished while this one ran
    (one that finished earlier is in the size this one saw when it began). A cut decided from
    a stale size once dropped another write's bytes."""

    def __init__(self):
        self.lock = threading.Lock()
        self._active: list[list[int]] = []  # per write in flight: [its end, others' done ends]

    def begin(self, end: int) -> list[int]:
        """Under ``lock``: a write to ``end`` starts; returns its record."""
        record = [end, 0]
        self._active.append(record)
        return record

    def finish(self, record: list[int], ok: bool) -> int:
        """Under ``lock``: that write ended; returns the length no cut of it may go below."""
        self._active.remove(record)
        if ok:
            for other in self._active:
                other[1] = max(other[1], record[0])
        return max([record[1], *(other[0] for other in self._active)])


class AioEngine:
    """Async tensor I/O on files through DeepSpeed's aio handle; see the module docstring."""

    def __init__(self, config: AioConfig | None = None, pool: PinnedPool | None = None):
        self.config = config or AioConfig()
        load_aio()  # fail here, with the fix, rather than inside a worker
        if self.config.use_gds:
            log.warning("AioConfig.use_gds: the GDS path is not implemented yet; using libaio")
        self._own_pool = pool is None
        self._pool = pool if pool is not None else PinnedPool(bounce_bytes(self.config))
        # every lane's bounce halves, carved now: from a shared pool, before its other users
        # fragment it (lanes are made lazily, one per worker thread, as requests come)
        chunk = self.config.bounce_chunk_bytes
        self._halves = [
            [self._pool.alloc(chunk), self._pool.alloc(chunk)] for _ in range(self.config.lanes)
        ]
        self._local = threading.local()
        self._lanes: list[_Lane] = []
        self._lanes_lock = threading.Lock()
        self._direct_ok: set[int] = set()  # st_dev values known to accept O_DIRECT
        self._executor = ThreadPoolExecutor(self.config.lanes, thread_name_prefix="infinity-aio")
        self._sizes: dict[str, FileGrowth] = {}
        self._closed = False

    # -- public API ---------------------------------------------------------------------------
    def pread(self, tensor: torch.Tensor, path: str | os.PathLike, file_offset: int = 0) -> Future:
        """Fill ``tensor`` with ``tensor.nbytes`` bytes of ``path`` from ``file_offset``."""
        return self._enqueue(False, tensor, path, file_offset)

    def pwrite(self, tensor: torch.Tensor, path: str | os.PathLike, file_offset: int = 0) -> Future:
        """Write ``tensor``'s bytes to ``path`` at ``file_offset``, creating the file if needed."""
        return self._enqueue(True, tensor, path, file_offset)

    def read(self, tensor: torch.Tensor, path: str | os.PathLike, file_offset: int = 0) -> int:
        return self.pread(tensor, path, file_offset).result()

    def write(self, tensor: torch.Tensor, path: str | os.PathLike, file_offset: int = 0) -> int:
        return self.pwrite(tensor, path, file_offset).result()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True)
        for halves in self._halves + [lane.halves for lane in self._lanes]:
            for half in halves:
                self._pool.free(half)
        self._lanes.clear()
        self._halves.clear()
        if self._own_pool:
            self._pool.close()

    def __enter__(self) -> AioEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- request set-up -----------------------------------------------------------------------
    def _enqueue(self, write: bool, tensor: torch.Tensor, path, file_offset: int) -> Future:
        if self._closed:
            raise ConfigError("AioEngine is closed")
        if not isinstance(tensor, torch.Tensor):
            raise ConfigError(f"expected a torch.Tensor, got {type(tensor).__name__}")
        if isinstance(file_offset, bool) or not isinstance(file_offset, int) or file_offset < 0:
            raise ConfigError(f"file_offset must be a non-negative int, got {file_offset!r}")
        if tensor.device.type not in ("cpu", "cuda"):
            raise ConfigError(f"tensors on {tensor.device} are not supported (cpu or cuda only)")
        if write and not tensor.is_contiguous():
            tensor = tensor.contiguous()
        buf = byte_view(tensor)
        ready = None
        if buf.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(buf.device))
        request = _Request(write, buf, os.fspath(path), file_offset, ready)
        return self._executor.submit(self._run, request)

    def _lane(self) -> _Lane:
        lane = getattr(self._local, "lane", None)
        if lane is None:
            lane = self._local.lane = _Lane(self)
            with self._lanes_lock:
                self._lanes.append(lane)
        return lane

    def _run(self, req: _Request) -> int:
        from infinity.io._transfer import run_read, run_write

        lane = self._lane()
        try:
            return (run_write if req.write else run_read)(self, lane, req)
        except BaseException:
            lane.drain()
            raise

    def _check_direct_io(self, fd: int, req: _Request) -> None:
        dev = os.fstat(fd).st_dev
        if dev in self._direct_ok:
            return
        point, fstype, _ = mount_of(os.path.dirname(os.path.abspath(req.path)))
        if fstype in MEMORY_FS and os.environ.get("INFINITY_ALLOW_TMPFS") != "1":
            raise StorageIOError(
                req.path,
                req.file_offset,
                req.buf.numel(),
                errno.EINVAL,
                f"{point} is {fstype}: memory, not a disk (kernels before 6.6 also refuse "
                "O_DIRECT there); files there cost RAM twice and are gone after a reboot. Use a "
                "directory on an NVMe drive (ext4 or xfs), or set INFINITY_ALLOW_TMPFS=1 for tests",
            )
        flags = (os.O_WRONLY if req.write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            os.close(os.open(req.path, flags | os.O_DIRECT | os.O_CLOEXEC))
        except OSError as exc:
            raise StorageIOError(
                req.path,
                req.file_offset,
                req.buf.numel(),
                exc.errno or errno.EINVAL,
                f"O_DIRECT is not supported on {fstype} at {point} ({exc.strerror}); "
                "put the files on a real filesystem such as ext4 or xfs (not tmpfs or overlayfs)",
            ) from None
        self._direct_ok.add(dev)

    def growth(self, path: str) -> FileGrowth:
        """The length bookkeeping of concurrent writes to one file (see FileGrowth)."""
        with self._lanes_lock:
            return self._sizes.setdefault(path, FileGrowth())

    def is_direct_buffer(self, lane: _Lane, buf: torch.Tensor) -> bool:
        """Whether DeepSpeed can DMA into ``buf`` without its own bounce copy."""
        if buf.is_cuda or buf.data_ptr() % A:
            return False
        is_pinned = getattr(lane.main, "is_pinned", None)
        return bool(is_pinned(buf)) if is_pinned is not None else buf.is_pinned()
