"""PinnedPool: one page-locked host region carved into aligned tensor views by the C++ Arena.

Pinning is slow and per-buffer pinning fragments host memory (a known cause of host OOM with
DeepSpeed's swapper), so the pool pins once and hands out views.

Memory kinds (``kind=``):
- ``"cuda"``: an anonymous mapping registered with CUDA (cudaHostRegister), exactly the size
  asked for, unregistered at close; fast host<->GPU copies. Default with CUDA. (torch's pinned
  allocator, ``pin_memory=True``, rounds each block up to a power of two and keeps freed blocks
  cached: a 6.9 GB pool takes 8 GiB and stays pinned after close; the bench's run under a 10 GiB
  cgroup was OOM-killed.)
- ``"locked"``: DeepSpeed's page-locked allocator (``new_cpu_locked_tensor``: aligned + mlock),
  which its aio handle recognises as direct-I/O capable. Default without CUDA.
- ``"aligned"``: plain aligned memory, no locking (DeepSpeed then bounces every transfer).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import resource
import threading

import psutil
import torch

from infinity._core import Arena
from infinity.config import ALIGNMENT_BYTES, format_size
from infinity.errors import CapacityError, ConfigError

log = logging.getLogger(__name__)

KINDS = ("auto", "cuda", "locked", "aligned")
POOL_SHARE = 0.9  # a pool may take at most this share of the host memory available now


def memlock_limit_bytes() -> int | None:
    """Soft RLIMIT_MEMLOCK (``ulimit -l``) in bytes; None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _locked_now_bytes() -> int:
    """Bytes this process has mlock'ed already (VmLck); RLIMIT_MEMLOCK bounds the total."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmLck:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2) means no limit


def _reclaimable(directory: str, file_key: str, shmem_key: str) -> int:
    """Page cache the kernel can drop to make room (it is charged to the cgroup); tmpfs can't."""
    try:
        with open(os.path.join(directory, "memory.stat")) as f:
            stat = dict(line.split()[:2] for line in f if line.strip())
        return max(0, int(stat.get(file_key, 0)) - int(stat.get(shmem_key, 0)))
    except (OSError, ValueError):
        return 0


_CGROUP = (  # (base, limit file, usage file, page-cache key, shmem key): v2, then v1
    ("/sys/fs/cgroup", "memory.max", "memory.current", "file", "shmem"),
    (
        "/sys/fs/cgroup/memory",
        "memory.limit_in_bytes",
        "memory.usage_in_bytes",
        "total_cache",
        "total_shmem",
    ),
)


def cgroup_memory() -> tuple[int, int] | None:
    """(limit, bytes left under it, page cache counted as free) of the tightest memory cgroup
    holding this process (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``, ancestors
    included); None when no limit is set."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    tightest = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            base, limit_file, usage_file, *keys = _CGROUP[0]
        elif "memory" in controllers.split(","):
            base, limit_file, usage_file, *keys = _CGROUP[1]
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):  # the process's cgroup, then each parent
            directory = os.path.join(base, *parts[:depth])
            limit = _read_int(os.path.join(directory, limit_file))
            used = _read_int(os.path.join(directory, usage_file))
            if limit is None or used is None or limit >= 1 << 60:  # v1's "no limit" is ~2**63
                continue
            left = min(limit, max(0, limit - used + _reclaimable(directory, *keys)))
            if tightest is None or left < tightest[1]:
                tightest = (limit, left)
    return tightest


def pinnable_bytes() -> tuple[int, str]:
    """The most one pool may take now (``POOL_SHARE`` of the memory available, so that the rest
    of the process and the OS keep room), and the numbers behind it, for messages."""
    mem = psutil.virtual_memory()
    free, where = (
        mem.available,
        (f"{format_size(mem.available)} of host memory available ({format_size(mem.total)} total)"),
    )
    cgroup = cgroup_memory()
    if cgroup is not None and cgroup[1] < free:
        free, where = (
            cgroup[1],
            (
                f"{format_size(cgroup[1])} left under this process's cgroup memory limit of "
                f"{format_size(cgroup[0])}"
            ),
        )
    return int(free * POOL_SHARE), where


class PinnedPool:
    """A pinned host buffer of ``capacity_bytes`` handing out aligned ``uint8`` views.

    The capacity is checked before anything is allocated: a pool may take at most 90% of the
    host memory available (``psutil.virtual_memory().available``), or of what is left under the
    cgroup's memory limit when that is less; beyond, CapacityError with the numbers (pinning more
    than there is aborts the process inside DeepSpeed or gets it OOM-killed).
    """

    def __init__(self, capacity_bytes: int, alignment: int = ALIGNMENT_BYTES, kind: str = "auto"):
        if kind not in KINDS:
            raise ConfigError(f"PinnedPool kind must be one of {KINDS}, got {kind!r}")
        if capacity_bytes < 0:
            raise ConfigError(f"PinnedPool capacity_bytes must be >= 0, got {capacity_bytes}")
        capacity_bytes = -(-capacity_bytes // alignment) * alignment
        if capacity_bytes:
            allowed, where = pinnable_bytes()
            if capacity_bytes > allowed:
                raise CapacityError(
                    f"cannot pin {format_size(capacity_bytes)}: {where}, and a pool may take at "
                    f"most {POOL_SHARE:.0%} of it ({format_size(allowed)}); lower the size asked "
                    "for (StoreConfig.pinned_bytes, AioConfig.lanes x bounce_buffer_bytes, "
                    "bench io --size) or free memory"
                )
        if kind == "auto":
            kind = "cuda" if torch.cuda.is_available() else "locked"
        self.kind = kind
        self.alignment = alignment
        self._arena = Arena(capacity_bytes, alignment)
        self._lock = threading.Lock()
        self._live: dict[int, int] = {}  # data_ptr -> arena offset
        self._buffer = self._allocate(capacity_bytes)
        self._base_ptr = self._buffer.data_ptr()
        if self._base_ptr % alignment:
            raise RuntimeError(
                f"pinned buffer at {self._base_ptr:#x} is not {alignment}-byte aligned "
                f"(kind {kind}); report this with your torch version {torch.__version__}"
            )

    def _allocate(self, nbytes: int) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        if self.kind == "cuda":
            # An anonymous mapping: page-aligned pages of its own (two heap blocks may share a
            # page, and CUDA refuses to register a page twice), given back when the last view
            # dies. torch's is_pinned() (so DeepSpeed's aio, which bounces every transfer
            # otherwise) asks CUDA about the storage's first byte: the mapping's first byte.
            view = torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)
            storage = view.untyped_storage()
            cudart = torch.cuda.cudart()
            err = cudart.cudaHostRegister(storage.data_ptr(), storage.nbytes(), 0)
            if err != cudart.cudaError.success:
                clear_cuda_error()
                raise CapacityError(
                    f"cannot pin {format_size(nbytes)} of host memory (cudaHostRegister: "
                    f"{err}); lower the pool size or raise the memory limit"
                )
            self._registered = storage.data_ptr()
            return view
        if self.kind == "locked":
            limit = memlock_limit_bytes()
            # the limit bounds the process's total: DeepSpeed aborts when its mlock fails
            room = None if limit is None else limit - _locked_now_bytes()
            if room is not None and room < nbytes and not _can_lock_unlimited():
                log.warning(
                    "memlock limit (ulimit -l) is %s, %s of it left, below the %s pool: using "
                    "unlocked aligned memory (DeepSpeed will bounce each transfer); raise "
                    "`ulimit -l` to lock it",
                    format_size(limit),
                    format_size(max(0, room)),
                    format_size(nbytes),
                )
                self.kind = "aligned"
            else:
                from infinity.io._deepspeed import load_aio

                handle = load_aio().aio_handle(1024 * 1024, 1, False, False, 1)
                self._locker = handle  # keeps the manager's owner alive with the pool
                return handle.new_cpu_locked_tensor(nbytes, torch.empty(0, dtype=torch.uint8))
        raw = torch.empty(nbytes + self.alignment, dtype=torch.uint8)
        shift = (-raw.data_ptr()) % self.alignment
        return raw[shift : shift + nbytes]

    # -- allocation -------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> torch.Tensor:
        """An aligned ``uint8`` view of ``nbytes``; raises CapacityError with the numbers."""
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)  # holds no pool memory; free() ignores it
        try:
            offset = self._arena.alloc(nbytes)
        except CapacityError as exc:
            raise CapacityError(f"pinned pool ({self.kind}): {exc}") from None
        view = self._buffer[offset : offset + nbytes]
        with self._lock:
            self._live[view.data_ptr()] = offset
        return view

    def free(self, view: torch.Tensor) -> None:
        if view.numel() == 0:
            return
        with self._lock:
            offset = self._live.pop(view.data_ptr(), None)
        if offset is None:
            raise ConfigError(
                f"PinnedPool.free: tensor at {view.data_ptr():#x} was not allocated by this pool"
            )
        self._arena.free(offset)

    def stats(self):
        return self._arena.stats()

    @property
    def capacity_bytes(self) -> int:
        return self._arena.capacity_bytes

    def close(self) -> None:
        """Release the region. Views still allocated keep it alive (leaked, with a warning)."""
        with self._lock:
            live = len(self._live)
        if live:
            log.warning("PinnedPool.close: %d views still allocated; not freeing the region", live)
            return
        if getattr(self, "_locker", None) is not None and self._buffer.numel():
            self._locker.free_cpu_locked_tensor(self._buffer)
        if getattr(self, "_registered", None) is not None:
            _unregister(self._registered)
        self._locker = self._registered = None
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def __del__(self) -> None:  # registered memory must be unregistered before it is freed
        if getattr(self, "_registered", None) is not None:
            # Views that outlive the pool keep the memory alive; unregistered, it stays valid
            # (pageable), and freeing it later cannot leave a stale registration behind.
            _unregister(self._registered)
            self._registered = None

    def __enter__(self) -> PinnedPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unregister(ptr: int) -> None:
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostUnregister(ptr)
    if err != cudart.cudaError.success:
        clear_cuda_error()
        log.warning("cudaHostUnregister(%#x) failed: %s", ptr, err)


def clear_cuda_error() -> None:
    """Reset CUDA's last-error state after a failed runtime call of ours. It is per thread and
    stays set until read, so torch's next kernel-launch check would raise it as its own error."""
    with open("/proc/self/maps") as maps:  # the runtime torch loaded (its soname varies)
        paths = sorted({line.split()[-1] for line in maps if "libcudart.so" in line})
    if paths:
        ctypes.CDLL(paths[0]).cudaGetLastError()
    else:
        log.warning("libcudart not found among the loaded libraries: CUDA's last error not cleared")


def _can_lock_unlimited() -> bool:
    # root (CAP_IPC_LOCK) may lock beyond RLIMIT_MEMLOCK
    return os.geteuid() == 0
