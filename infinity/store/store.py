"""TieredStore: tensors by key over GPU memory, pinned CPU memory and NVMe.

Call order:
- ``put``: allocate fresh extents (copy-on-write), write them through the aio engine while the
  bytes are hashed (xxh3 per 16 MiB chunk, checksum.py), then (under the lock) swap the record
  in and keep a copy in the asked tier. The replaced extents are freed only after the next
  manifest commit.
- ``get``/``prefetch``: GPU copy, else pinned copy, else read the extents from NVMe (aio), check
  the checksum, and copy pinned -> GPU on the tier's copy stream (the caller's stream waits on an
  event, so compute on the default stream overlaps the copy).
- ``flush``: fsync the data files, then commit the manifest atomically (manifest.py).

Guarantees
----------
- A crash (kill -9, or power loss on a drive that honours fsync) at any instant loses nothing
  that ``flush`` or ``close`` returned for: the store reopens in the state of the last flush that
  returned, or of the one under way, never a mix of two (copy-on-write extents; the manifest
  written to a temporary file, fsynced, renamed). A key rewritten in place by ``pwrite`` since
  the last flush reads as its old value or raises IntegrityError naming it, never as mixed bytes
  (inplace.json lists it before its first byte changes; it is read verified); ``fsck`` names it,
  a put or pwrite repairs it. A creation cut short is done again on the next open.
- Readers (``readonly=True``, any number, any process) write nothing. Each ``get`` returns one
  committed version of the key, whole: never a mix, never a false IntegrityError; they follow
  the writer's commits. A key being rewritten in place is read after the writer's next commit
  (or at once, verified, if the writer died); ``compact`` does not cut a file a reader is in.
- A second writer is refused (StoreLockedError): an flock on the first directory, released when
  its holder exits or dies; deleting LOCK does not lift it.
- A damaged or tampered store: a manifest that fails its checksum or its format is one
  IntegrityError naming the file (ConfigError if a newer version wrote it); a bad record (fields,
  sizes, extents out of range or over another key's) fails only its key (IntegrityError;
  ``fsck`` and ``damaged()`` name it); changed data bytes are an IntegrityError on read. Whatever
  its files say, the store opens, reads, writes and deletes only its own files: no link is
  followed, data files have plain names other than the store's records, a FIFO or a device is
  refused without blocking.
- Errors are InfinityError subclasses. A full disk is a StorageIOError (ENOSPC, with the free
  space) that leaves the last commit in place; after a failed ``flush`` the store keeps working
  and a later flush commits everything. ``close`` waits for the calls in flight; later calls
  raise InfinityError.
- Not covered: a drive that acknowledges writes it has not made durable; bytes changed on disk
  when ``verify_checksums=False`` (only keys rewritten in place since a crash are always
  verified); someone who rewrites data and checksums consistently (checksums are not
  signatures); the data of a damaged record, which is not recovered.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import torch

from infinity.config import format_size, parse_device
from infinity.errors import (
    CapacityError,
    ConfigError,
    InfinityError,
    IntegrityError,
    StorageIOError,
)
from infinity.io import AioEngine, copy, copy_stream, release_blocks
from infinity.io.aio import byte_view
from infinity.store import manifest as mf
from infinity.store._checks import (
    check_directory,
    check_distinct,
    check_key,
    check_path_arg,
    dense,
    host_bytes,
    listed,
    pairs,
    release_lock,
    take_lock,
    writer_alive,
)
from infinity.store._files import io_error, open_regular
from infinity.store.checksum import CHUNK_BYTES, ChunkHasher, scheme_of
from infinity.store.config import StoreConfig, StoreStats
from infinity.store.extents import SpaceMap
from infinity.store.manifest import Entry
from infinity.store.members import check_members, create
from infinity.store.pieces import transfer
from infinity.store.tiers import GpuTier, PinnedTier, copy_to_gpu, touch

TIERS = ("gpu", "cpu", "nvme")
# I/O granules of a tensor: big enough that DeepSpeed's handle, which splits a request over its
# intra_op_parallelism threads, issues whole blocks (see _piece_bytes); a multiple of the
# checksum chunk. Reads: the lane that reads a piece hashes it; prefetch overlaps one key's last
# hash with the next key's reads. Writes: checksums overlap all of it.
MIN_PIECE_BYTES, WRITE_PIECE_BYTES = 2 * CHUNK_BYTES, 64 << 20
PREFETCH_WINDOW = 2  # keys a prefetch reads at once
READ_ATTEMPTS = 8  # reads of a read-only store retried while a writer commits under them
REWRITE_WAIT_S = 30.0  # a read-only reader waits this long for a key rewritten in place
HASH_THREADS = max(2, min(8, os.cpu_count() or 2))  # chunks of finished reads hashed at once


class UnknownKeyError(InfinityError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class EntryInfo:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    tiers: tuple[str, ...]
    checksum: str
    version: int


class TieredStore:
    """See the module docstring. Open with ``TieredStore.open(path_or_paths, StoreConfig(...))``."""

    @classmethod
    def open(
        cls, paths, config: StoreConfig | None = None, *, readonly: bool = False, pool=None
    ) -> TieredStore:
        """``pool``: the process's PinnedPool to take the aio engine's bounce buffers and the
        pinned tier from (it must hold ``io.bounce_bytes(config.aio)`` + ``pinned_bytes``;
        the caller closes it after the store); None: the store makes its own."""
        return cls(paths, config or StoreConfig(), readonly=readonly, pool=pool)

    def __init__(self, paths, config: StoreConfig, readonly: bool = False, pool=None):
        if isinstance(paths, str | os.PathLike | bytes) or not isinstance(paths, Iterable):
            paths = [paths]
        self.paths = [check_path_arg(p) for p in paths]
        if not self.paths:
            raise ConfigError("TieredStore.open needs at least one directory")
        if not isinstance(config, StoreConfig):
            raise ConfigError(f"config must be a StoreConfig, got {type(config).__name__}")
        self.config, self.readonly = config, readonly
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # a read or an in-place write ended
        self._flush_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._closed = True
        self._calls = 0  # public calls in flight: close() waits for them
        for path in self.paths:
            check_directory(path, create=not readonly)
        check_distinct(self.paths)
        if not readonly:
            self._lock_fd = take_lock(self.paths[0])
        try:
            self._load()
            self._engine = AioEngine(config.aio, pool=pool)
            self.cpu = PinnedTier(config.pinned_bytes, self._lock, pool)
            self.gpu = GpuTier(config.gpu_bytes, self._lock)
            self._executor = ThreadPoolExecutor(
                config.io_threads, thread_name_prefix="infinity-store"
            )
            self._window = ThreadPoolExecutor(
                PREFETCH_WINDOW * config.io_threads, thread_name_prefix="infinity-load"
            )
            self._hashers = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="infinity-hash")
        except BaseException:
            self._release()  # what was made so far (a pinned tier too big: the engine's pool)
            raise
        self._stats = StoreStats()
        aio = config.aio  # one full block per handle thread, rounded to whole checksum chunks
        whole = aio.block_size_bytes * aio.intra_op_parallelism
        self._piece_bytes = max(MIN_PIECE_BYTES, -(-whole // CHUNK_BYTES) * CHUNK_BYTES)
        self._closed = False

    # -- opening ------------------------------------------------------------------------------
    def _load(self) -> None:
        doc = mf.read_manifest(self.paths[0])
        if doc is None:
            if self.readonly:
                raise ConfigError(f"no infinity store at {self.paths[0]} (no {mf.MANIFEST})")
            doc = create(self.paths)
        check_members(self.paths, doc)
        self._store_id = doc["store_id"]
        self._files = [os.path.join(p, n) for p, n in zip(self.paths, doc["files"], strict=True)]
        self._space = SpaceMap(len(self.paths), self.config.stripe_min_bytes)
        self._pending_free: list[Entry] = []
        self._dirty = False
        self._adopt(doc)
        self._token = mf.commit_token(self.paths[0])
        self._inplace: set[str] = set()  # keys rewritten in place since the last commit
        self._torn: set[str] = set()  # of those, the ones nobody writes (a crash, a failure)
        self._rewriting: set[str] = set()  # read-only: keys the live writer rewrites in place
        self._note_inplace(*mf.read_inplace(self.paths[0], self._generation))
        if self._inplace:  # a crashed writer's: tell readers that nobody is writing them now
            mf.write_inplace(self.paths[0], self._generation, self._inplace, self._torn)

    def _note_inplace(self, keys: set[str], settled: set[str]) -> None:
        """Keys listed as rewritten in place since the committed generation: their bytes may
        be torn (a crash, or a writer still at it), so they are read verified; a read-only
        reader waits for the live writer's next commit before reading those it is writing
        (not ``settled``)."""
        keys = {k for k in keys if k in self._entries}
        for key in keys:
            self._entries[key].suspect = True
        if self.readonly:
            live = keys - settled
            self._rewriting = live if live and writer_alive(self.paths[0]) else set()
        else:  # a writer opening: whatever is listed was left by a crash
            self._inplace, self._torn = set(keys), set(keys)

    def _adopt(self, doc: dict) -> None:
        """Take the manifest's records as this store's entries. A record that cannot be right
        (bad fields, extents past a file or over another key's) is kept aside in ``_bad``: its
        key raises IntegrityError on reads and fsck names it; the rest of the store works."""
        self._generation = doc["generation"]
        self._entries, self._bad = {}, {}
        for key, rec in doc["entries"].items():
            try:
                entry = Entry.from_record(key, rec, len(self._files))
                self._space.reserve(entry.extents)
            except (IntegrityError, ValueError) as exc:
                problem = str(exc)
                if not isinstance(exc, IntegrityError | ConfigError):
                    problem = f"manifest record of key {key!r} overlaps another key's extents"
                self._bad[key] = problem
                continue
            self._entries[key] = entry

    # -- public API ---------------------------------------------------------------------------
    def put(self, key: str, tensor: torch.Tensor, tier: str = "nvme") -> None:
        """Store ``tensor`` under ``key`` (durable after ``flush``) and keep a copy in ``tier``."""
        with self._call(write=True):
            check_key(key)
            if not isinstance(tier, str) or tier not in TIERS:
                raise ConfigError(f"tier must be one of {TIERS}, got {tier!r}")
            src = dense(key, tensor)
            device = src.device if src.is_cuda else None
            budget = {"cpu": self.config.pinned_bytes, "gpu": self.config.gpu_bytes}.get(tier)
            if budget is not None and src.nbytes > budget:
                raise CapacityError(
                    f"put({key!r}, tier={tier!r}): {format_size(src.nbytes)} exceeds the whole "
                    f"{tier} tier ({format_size(budget)}); raise StoreConfig."
                    f"{'pinned_bytes' if tier == 'cpu' else 'gpu_bytes'} or put it with "
                    "tier='nvme'"
                )
            raw = host_bytes(src)
            entry = self._write_new(key, src, raw)
            if tier == "cpu":
                self._ensure_cpu(entry, source=raw)
            elif tier == "gpu":
                self._ensure_gpu(entry, device or parse_device("cuda"), source=src)

    def pwrite(self, keys: Iterable[str], tensors: Iterable[torch.Tensor]) -> Future:
        """Write each tensor under its key in the background; durable after ``flush``. A key
        whose byte size is unchanged is rewritten **in place**, in its own extents (a tensor
        rewritten every step, such as an optimizer state, takes its size on disk once and the
        files do not grow); a new key, or one whose size changed, gets new extents as ``put``.

        After a crash before the next ``flush``, a key written here reads back as its old
        value, its new value, or an IntegrityError naming it, never as silently mixed bytes:
        keys are listed in ``inplace.json`` before their first in-place write, and read back
        verified whatever ``verify_checksums`` says. Keys not written since the last flush read
        back exactly. Tier copies of a rewritten key are dropped (pass CPU tensors, ideally
        pinned: a CUDA tensor is first copied to pageable memory)."""
        with self._call(write=True):
            keys, tensors = pairs("pwrite", keys, tensors, "tensor")
            items = []
            for key, tensor in zip(keys, tensors, strict=True):
                check_key(key)
                src = dense(key, tensor)
                items.append((key, src, host_bytes(src)))
            with self._lock:
                same = {k for k, _, raw in items if self._same_size(k, raw.numel())}
                if not same <= self._inplace - self._torn:  # listed before a byte changes
                    keys_now, torn_now = self._inplace | same, self._torn - same
                    mf.write_inplace(self.paths[0], self._generation, keys_now, torn_now)
                    self._inplace, self._torn = keys_now, torn_now
            jobs = [partial(self._write_one, *item) for item in items]
            return self._in_order(jobs, window=self.config.aio.lanes)

    def _same_size(self, key: str, nbytes: int) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.nbytes == nbytes

    def _write_one(self, key: str, src: torch.Tensor, raw: torch.Tensor) -> None:
        with self._lock:
            entry = self._entries.get(key)
            while entry is not None and (entry.writing or entry.readers or entry.busy):
                self._changed.wait()  # readers finish with the old bytes first
                entry = self._entries.get(key)
            if entry is None or entry.nbytes != raw.numel() or key not in self._inplace:
                entry = None
            else:
                entry.writing = True
                self.gpu.drop(entry)
                self.cpu.drop(entry)
        if entry is None:
            self._write_new(key, src, raw)
            return
        hasher, ok = ChunkHasher(raw.numel()), False
        try:
            self._io(raw, entry.extents, write=True, on_piece=hasher.update)
            ok = True
        finally:
            with self._lock:
                entry.writing = False
                entry.suspect = not ok  # torn by the failure: reads check, and fail, loudly
                if not ok:
                    self._torn.add(key)
                if ok:
                    entry.dtype, entry.shape = src.dtype, tuple(src.shape)
                    entry.checksum, entry.version = hasher.digest(), entry.version + 1
                self._dirty = True
                self._changed.notify_all()

    def _write_new(self, key: str, src: torch.Tensor, raw: torch.Tensor) -> Entry:
        """Write ``raw`` into fresh extents and swap the key's record in (copy-on-write: the
        replaced extents are freed after the next commit)."""
        with self._lock:
            extents = self._space.allocate(raw.numel())
        hasher = ChunkHasher(raw.numel())
        try:
            self._io(raw, extents, write=True, on_piece=hasher.update)
        except BaseException:
            for ext in extents:  # what did get written would keep the disk full
                try:
                    release_blocks(self._files[ext.file], ext.file_offset, ext.nbytes)
                except OSError:
                    pass  # the write's own error is the one to report
            with self._lock:
                self._space.free(extents)
            raise
        with self._lock:
            old = self._entries.get(key)
            version = old.version + 1 if old else 1
            entry = Entry(
                key, src.dtype, tuple(src.shape), raw.numel(), extents, hasher.digest(), version
            )
            if old is not None:
                self._forget(old)
            self._entries[key] = entry
            self._dirty = True
            self._changed.notify_all()
        return entry

    def get(self, key: str, device="cpu") -> torch.Tensor:
        """A tensor equal to what was put. On the GPU, a GPU-resident key returns its resident
        tensor (treat it as read-only); everything else is a new tensor."""
        with self._call():
            check_key(key)
            dev = parse_device(device)
            start = time.perf_counter()
            if dev.type == "cuda":
                entry, (result, ready) = self._reading(
                    key, lambda e: self._ensure_gpu(e, dev, admit=False)
                )
                torch.cuda.current_stream(dev).wait_event(ready)
            else:
                entry, result = self._reading(key, self._read_cpu)
            self._stats.stall_s += time.perf_counter() - start
            return _typed(result, entry)

    def prefetch(self, keys: str | Iterable[str], tier: str = "cpu") -> Future:
        """Make keys resident in ``tier`` ("cpu" or "gpu") in the background."""
        with self._call():
            if not isinstance(tier, str) or tier not in ("cpu", "gpu"):
                raise ConfigError(f"prefetch tier must be 'cpu' or 'gpu', got {tier!r}")
            keys = [keys] if isinstance(keys, str) else listed("prefetch", "keys", keys)
            for key in keys:
                self._entry(key)  # unknown keys fail here, not in the background
            dev = parse_device("cuda") if tier == "gpu" else None

            def load(entry: Entry) -> None:
                if dev is None:
                    self._ensure_cpu(entry)
                else:
                    self._ensure_gpu(entry, dev)

            return self._in_order([partial(self._reading, k, load) for k in dict.fromkeys(keys)])

    def pread(self, keys: Iterable[str], outs: Iterable[torch.Tensor]) -> Future:
        """Read each key from NVMe into the caller's CPU buffer (pinned for full speed; at least
        the key's nbytes, any dtype), checksums verified, in the background. The tiers are
        neither used nor changed: for executors that manage their own buffers."""
        keys, outs = pairs("pread", keys, outs, "buffer")

        def check(entry: Entry, raw: torch.Tensor) -> torch.Tensor:
            if raw.device.type != "cpu" or raw.numel() < entry.nbytes:
                raise ConfigError(
                    f"pread of {entry.key!r} ({entry.nbytes} bytes) needs a contiguous CPU "
                    f"buffer of at least that size, got {raw.numel()} bytes on {raw.device}"
                )
            return raw[: entry.nbytes]

        with self._call():
            jobs = []
            for key, out in zip(keys, outs, strict=True):
                if not isinstance(out, torch.Tensor):
                    raise ConfigError(
                        f"pread of {key!r}: buffers are tensors, got {type(out).__name__}"
                    )
                raw = byte_view(out)
                check(self._entry(key), raw)  # a wrong buffer fails here, not in the background
                read = partial(lambda raw, e: self._load_bytes(e, check(e, raw)), raw)
                jobs.append(partial(self._reading, key, read))
            return self._in_order(jobs)

    def _in_order(self, jobs, window: int = PREFETCH_WINDOW) -> Future:
        """Run the jobs, started in order, ``window`` at a time, so that one key's last pieces
        and checksum overlap the next key's I/O (for prefetch, the last keys are the ones left
        resident); the future resolves once all are done, to their count, or to the first
        error after every job in flight has finished."""

        def run() -> int:
            running: deque[Future] = deque()
            try:
                for job in jobs:
                    running.append(self._window.submit(job))
                    if len(running) >= window:
                        running.popleft().result()
            finally:
                errors = [f.exception() for f in running]  # wait for every job in flight
            for error in errors:
                if error is not None:
                    raise error
            return len(jobs)

        return self._executor.submit(run)

    def evict(self, key: str, tier: str = "cpu") -> None:
        """Drop the copy of ``key`` held in ``tier``; the NVMe copy stays."""
        if not isinstance(tier, str) or tier not in ("cpu", "gpu"):
            raise ConfigError(
                f"evict tier must be 'cpu' or 'gpu' (NVMe holds the data: use delete), got {tier!r}"
            )
        with self._call():
            entry = self._entry(key)
            with self._lock:
                while tier == "cpu" and (entry.busy or entry.loading):  # readers finish first
                    self.cpu.changed.wait()
                (self.cpu if tier == "cpu" else self.gpu).drop(entry)

    def delete(self, key: str) -> None:
        with self._call(write=True), self._lock:
            entry = self._entry(key)
            self._forget(entry)
            del self._entries[key]
            self._torn.discard(key)
            self._dirty = True

    def damaged(self) -> dict[str, str]:
        """{key: problem} of the manifest's records that cannot be right (bad fields, extents
        over another key's): their keys raise IntegrityError and are not in ``keys()``. No data
        is read; ``fsck`` reads every key and reports these too."""
        return dict(self._bad)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def entry(self, key: str) -> EntryInfo:
        with self._call():
            e = self._entry(key)
        return EntryInfo(e.key, e.dtype, e.shape, e.nbytes, e.tiers, e.checksum, e.version)

    def flush(self) -> None:
        """Everything put so far is durable on NVMe when this returns. On a failure (a full
        disk: StorageIOError with the free space) nothing is lost: the committed state on disk
        stays the previous one, the store keeps working, and a later flush commits it all."""
        with self._call(write=True):
            self._commit()

    def _commit(self) -> None:
        with self._flush_lock, self._lock:
            if not self._dirty:
                return
            for path in self._files:
                if os.path.lexists(path):
                    fd = open_regular(path, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    except OSError as exc:
                        raise io_error(exc, path, "fsync the data file") from None
                    finally:
                        os.close(fd)
            doc = {
                "format": mf.FORMAT,
                "version": mf.FORMAT_VERSION,
                "store_id": self._store_id,
                "generation": self._generation + 1,
                "files": [os.path.basename(f) for f in self._files],
                "entries": {k: e.to_record() for k, e in self._entries.items()},
            }
            if self._inplace:  # listed for the new generation too, before it is committed
                mf.write_inplace(self.paths[0], self._generation + 1, self._inplace, self._torn)
            mf.write_atomic(self.paths[0], mf.MANIFEST, mf.encode(doc))
            self._generation += 1
            for old in self._pending_free:  # extents a read still uses are freed after it
                if old.readers:
                    old.free_unread = True
                else:
                    self._space.free(old.extents)
            self._pending_free = []
            self._dirty = False
            # in-place writes still running, or torn by a failure, stay listed past the commit
            live = {k for k in self._inplace if _unsettled(self._entries.get(k))}
            self._torn &= live
            if live != self._inplace:
                self._inplace = live
                mf.write_inplace(self.paths[0], self._generation, live, self._torn)

    def fsck(self, progress: Callable[[int, int], None] | None = None) -> dict[str, str]:
        """Read every key from NVMe and check its checksum and extents: {key: problem}, the
        manifest's invalid records included. ``progress(nbytes_done, nbytes_total)`` runs after
        each key."""
        with self._call():
            return self._fsck(progress or (lambda _done, _total: None))

    def _fsck(self, progress: Callable[[int, int], None]) -> dict[str, str]:
        problems: dict[str, str] = dict(self._bad)
        keys = self.keys()
        with self._lock:
            sizes = [e.nbytes if (e := self._entries.get(k)) else 0 for k in keys]
        done, total = 0, sum(sizes)

        def check(entry: Entry) -> None:  # raises, so that a commit landing meanwhile retries
            sizes = [os.lstat(f).st_size if os.path.lexists(f) else 0 for f in self._files]
            short = [
                e for e in entry.extents if e.nbytes and e.file_offset + e.nbytes > sizes[e.file]
            ]
            if short:
                raise IntegrityError(f"extent past the end of {self._files[short[0].file]}")
            self._load_bytes(entry, torch.empty(entry.nbytes, dtype=torch.uint8))

        for key, nbytes in zip(keys, sizes, strict=True):
            try:
                self._reading(key, check)
            except UnknownKeyError:
                pass  # deleted by the writer since
            except (IntegrityError, StorageIOError) as exc:
                problems[key] = str(exc)
            done += nbytes
            progress(done, total)
        return problems

    def compact(self) -> int:
        """Flush, then give back the free space at the end of each data file; returns bytes
        released. (Free space between extents is reused by later puts.) A file that a reader
        in another process is reading at that instant keeps its tail until the next compact:
        that reader may still follow an older manifest into it."""
        with self._call(write=True):
            self._commit()
            released = 0
            with self._lock:
                for i, path in enumerate(self._files):
                    if os.path.lexists(path):
                        released += self._cut_tail(path, self._space.high_water(i))
            return released

    def _cut_tail(self, path: str, keep: int) -> int:
        """Truncate the data file ``path`` to ``keep`` bytes unless a reader holds it
        (``_shared_files``); the bytes released."""
        fd = open_regular(path, os.O_WRONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # a reader in another process is in it: next time
            size = os.fstat(fd).st_size
            if size <= keep:
                return 0
            os.ftruncate(fd, keep)
            return size - keep
        except OSError as exc:
            raise io_error(exc, path, f"truncate it to {keep} bytes") from None
        finally:
            os.close(fd)

    def stats(self) -> StoreStats:
        with self._lock:
            s = self._stats
            s.keys = len(self._entries)
            s.gpu_bytes, s.pinned_bytes = self.gpu.used_bytes, self.cpu.used_bytes
            s.nvme_bytes = sum(e.nbytes for e in self._entries.values())
            return StoreStats(
                **{k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(s).items()}
            )

    def close(self) -> None:
        """Wait for the calls in flight and the background work (pwrite, prefetch, pread
        futures), flush, and release everything; later calls raise InfinityError. A failed
        flush (a full disk) is raised after the release: the store then keeps its last
        committed state on disk."""
        with self._lock:
            if self._closed:
                return
            self._closed = True  # new calls are refused from here on
            while self._calls:
                self._changed.wait()
        try:
            self._executor.shutdown(wait=True)
            if not self.readonly:
                self._commit()
        finally:
            self._release()

    def _release(self) -> None:
        """Stop the threads, free the memory and drop the writer lock, of whatever exists."""
        for name in ("_executor", "_window", "_hashers"):
            if hasattr(self, name):
                getattr(self, name).shutdown(wait=True)
        for name in ("gpu", "cpu", "_engine"):
            if hasattr(self, name):
                getattr(self, name).close()
        self._release_lock()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _call(self, write: bool = False):
        """A public call: refused once ``close`` began, which waits for those in flight."""
        with self._lock:
            if self._closed:
                raise InfinityError(f"store {self.paths[0]} is closed")
            if write and self.readonly:
                raise ConfigError(f"store {self.paths[0]} was opened read-only")
            self._calls += 1
        try:
            yield
        finally:
            with self._lock:
                self._calls -= 1
                if not self._calls:
                    self._changed.notify_all()

    def _entry(self, key: str) -> Entry:
        check_key(key)
        entry = self._entries.get(key)
        if entry is None and key in self._bad:
            raise IntegrityError(self._bad[key] + " (infinity store fsck lists every damaged key)")
        if entry is None:
            raise UnknownKeyError(
                f"no key {key!r} in store {self.paths[0]} ({len(self._entries)} keys)"
            )
        return entry

    def _reading(self, key: str, read):
        """``read(entry)`` of ``key``'s current entry, whose extents cannot be freed (so not
        rewritten by a later put) until it returns: ``(entry, result)``, whole. A read-only
        store first takes the writer's latest commit, and reads again when a commit landed
        during the read (the writer may then have reused the extents it read): readers see
        one committed version of a key, never a mix, and never a false IntegrityError."""
        attempts, waited = 0, time.monotonic()
        while attempts < READ_ATTEMPTS:
            token = self._refresh() if self.readonly else None
            if token is not None and key in self._rewriting:
                self._wait_rewrite(key, token, waited)
                continue
            attempts += 1
            with self._lock:
                entry = self._entry(key)
                while entry.writing:  # a pwrite in place of this key: read its new value
                    self._changed.wait()
                    entry = self._entry(key)
                entry.readers += 1
            try:
                with self._shared_files(entry):
                    result = read(entry)
            except (IntegrityError, StorageIOError):
                if token is None or mf.commit_token(self.paths[0]) == token:
                    raise
                continue  # the extents changed under the read: take the new commit
            finally:
                self._unpin(entry)
            if token is None or mf.commit_token(self.paths[0]) == token:
                return entry, result
        raise InfinityError(
            f"key {key!r} of {self.paths[0]} changed {READ_ATTEMPTS} times while being read: "
            "the writer commits faster than this reader reads; read when it pauses"
        )

    def _wait_rewrite(self, key: str, token, since: float) -> None:
        """A read-only reader of a key the (live) writer rewrites in place waits for the
        writer's next commit: until then the key's bytes on disk may be half new."""
        if time.monotonic() - since > REWRITE_WAIT_S:
            raise InfinityError(
                f"key {key!r} of {self.paths[0]} is being rewritten in place by the store's "
                f"writer, which has not committed for {REWRITE_WAIT_S:.0f} s; it can be read "
                "after the writer's next flush"
            )
        polls = 0
        while (
            mf.commit_token(self.paths[0]) == token and time.monotonic() - since <= REWRITE_WAIT_S
        ):
            polls += 1
            if polls % 20 == 0 and not writer_alive(self.paths[0]):
                with self._lock:  # it died mid-write: read the keys verified, now
                    self._rewriting = set()
                return
            time.sleep(0.01)

    @contextlib.contextmanager
    def _shared_files(self, entry: Entry):
        """A read-only store holds the data files it reads shared (flock) while it reads:
        the writer's ``compact`` does not cut a file's tail under it (its manifest may be one
        commit old, its extents freed and past the new end: DeepSpeed's handle asserts, and
        aborts the process, on a read past the end of a file)."""
        if not self.readonly:  # this process's readers pin their extents instead
            yield
            return
        held = []  # a descriptor of its own per read: flocks belong to open files
        try:
            for i in sorted({e.file for e in entry.extents}):
                try:
                    held.append(open_regular(self._files[i], os.O_RDONLY))
                except StorageIOError:
                    continue  # no such file: the read itself says so
                fcntl.flock(held[-1], fcntl.LOCK_SH)
            yield
        finally:
            for fd in held:
                os.close(fd)  # drops the lock

    def _unpin(self, entry: Entry) -> None:
        with self._lock:
            entry.readers -= 1
            if entry.readers == 0 and entry.free_unread:
                entry.free_unread = False
                self._space.free(entry.extents)
            self._changed.notify_all()

    def _refresh(self):
        """A read-only store takes the writer's latest commit: entries whose record changed are
        replaced (their resident copies dropped), the others keep theirs. Returns the token of
        the manifest now adopted."""
        while True:
            token = mf.commit_token(self.paths[0])
            if token == self._token:
                return token
            if token is None:
                raise ConfigError(
                    f"{self.paths[0]}: {mf.MANIFEST} is gone since this reader opened the store"
                )
            doc = mf.read_manifest(self.paths[0])
            journal = mf.read_inplace(self.paths[0], doc["generation"]) if doc else (set(), set())
            if mf.commit_token(self.paths[0]) != token or doc is None:
                continue  # replaced while being read
            with self._lock:
                old = self._entries
                self._space = SpaceMap(len(self.paths), self.config.stripe_min_bytes)
                self._adopt(doc)
                for key, entry in self._entries.items():
                    kept = old.pop(key, None)
                    if kept is not None and kept.to_record() == entry.to_record():
                        self._entries[key] = kept
                for gone in old.values():
                    self._forget(gone)
                self._pending_free = []
                self._note_inplace(*journal)
                self._token = token

    def _forget(self, entry: Entry) -> None:
        """Drop a replaced or deleted entry's copies; its extents wait for the next commit."""
        entry.retired = True
        self.gpu.drop(entry)
        if entry.busy:  # readers still copy from the view: the last one frees it
            self.cpu.leave(entry)
        else:
            self.cpu.drop(entry)
        self._pending_free.append(entry)

    def _io(self, raw, extents, write: bool, on_piece=None, on_done=None) -> None:
        """``transfer`` (pieces.py) of ``raw`` to or from its extents, counted in the stats."""
        step = max(self._piece_bytes, WRITE_PIECE_BYTES) if write else self._piece_bytes
        start = time.perf_counter()
        op = self._engine.pwrite if write else self._engine.pread
        transfer(op, self._files, raw, extents, step, self._hashers, write, on_piece, on_done)
        elapsed = time.perf_counter() - start
        with self._lock:
            if write:
                self._stats.disk_write_bytes += raw.numel()
                self._stats.disk_write_s += elapsed
            else:
                self._stats.disk_read_bytes += raw.numel()
                self._stats.disk_read_s += elapsed

    def _load_bytes(self, entry: Entry, out: torch.Tensor, also=None) -> None:
        """Read ``entry`` into ``out`` and check it; ``also(at, piece)`` sees each piece as soon
        as it is in, while later pieces are still being read. The hashing threads hash each
        finished piece's chunks in parallel (checksum.py), so the check costs about one chunk's
        hash after the last byte."""
        if not self.config.verify_checksums and not entry.suspect:
            self._io(out, entry.extents, write=False, on_piece=also)
            return
        hasher = ChunkHasher(entry.nbytes, scheme_of(entry.checksum))
        self._io(out, entry.extents, write=False, on_piece=also, on_done=hasher.update)
        actual = hasher.digest()
        if actual != entry.checksum:
            files = sorted({self._files[e.file] for e in entry.extents})
            raise IntegrityError(
                f"checksum mismatch for key {entry.key!r}: read {actual}, stored "
                f"{entry.checksum}, from {', '.join(files)}; the data is corrupt: put the key "
                "again or restore the store (infinity store fsck lists every damaged key)"
            )

    def _read_cpu(self, entry: Entry) -> torch.Tensor:
        with self._lock:
            view = entry.cpu
            if view is not None:
                entry.busy += 1
                touch(entry, "cpu")
                self._stats.hits["cpu"] += 1
            else:
                self._stats.misses["cpu"] += 1
        if view is None:
            out = torch.empty(entry.nbytes, dtype=torch.uint8)
            self._load_bytes(entry, out)
            return out
        try:
            return view.clone()
        finally:
            self._release_reader(entry)

    def _release_reader(self, entry: Entry) -> None:
        with self._lock:
            entry.busy -= 1
            if entry.busy == 0 and entry.retired and entry.cpu is not None:
                self.cpu.pool.free(entry.cpu)
                entry.cpu = None
            self.cpu.changed.notify_all()

    def _ensure_cpu(self, entry: Entry, source: torch.Tensor | None = None, also=None) -> bool:
        """Make ``entry`` resident in the pinned tier; True when this call read it from disk
        (then ``also`` saw every piece, see _load_bytes)."""
        with self._lock:
            while entry.loading and entry.cpu is None:  # another thread is loading it
                self.cpu.changed.wait()
            if entry.cpu is not None:
                touch(entry, "cpu")
                self._stats.hits["cpu"] += 1
                return False
            if source is None:
                self._stats.misses["cpu"] += 1
            entry.loading = True
            try:
                view = self.cpu.allocate(entry)
            except BaseException:
                entry.loading = False
                self.cpu.changed.notify_all()
                raise
        ok = False
        try:
            if source is not None:
                view.copy_(source)
            else:
                self._load_bytes(entry, view, also)
            ok = True
        finally:
            with self._lock:
                entry.loading = False
                self.cpu.settle(entry, view, admit=ok and entry.cpu is None and not entry.retired)
        return source is None

    def _ensure_gpu(
        self,
        entry: Entry,
        device: torch.device,
        source: torch.Tensor | None = None,
        admit: bool = True,
    ):
        with self._lock:
            gpu = entry.gpu
            if gpu is not None and gpu.device == device:
                touch(entry, "gpu")
                self._stats.hits["gpu"] += 1
                return gpu, entry.gpu_ready
            self._stats.misses["gpu"] += 1
            if admit:
                self.gpu.make_room(entry)
        if source is not None:  # a put with tier="gpu": keep our own copy
            src = byte_view(source.contiguous())
            with torch.cuda.stream(copy_stream(device)):
                out = torch.empty_like(src, device=device)
            after = torch.cuda.current_stream(device).record_event()
            ready = copy(out, src, after=after)
        else:
            out, ready = self._host_to_gpu(entry, device)
        self._stats.h2d_bytes += entry.nbytes
        if admit:
            with self._lock:
                if not entry.retired and entry.gpu is None:
                    self.gpu.admit(entry, out, ready)
        return out, ready

    def _host_to_gpu(self, entry: Entry, device: torch.device):
        """NVMe -> pinned tier -> GPU, each piece copied up as soon as it is read and hashed (the
        copy overlaps the reads of later pieces); a pinned hit is one copy; pageable if the
        pinned tier cannot fit the tensor."""
        with torch.cuda.stream(copy_stream(device)):
            out = torch.empty(entry.nbytes, dtype=torch.uint8, device=device)
        done = [torch.cuda.Event()]  # never recorded (no bytes): waiting on it is a no-op

        def upload(at: int, piece: torch.Tensor) -> None:
            done[0] = copy(out[at : at + piece.numel()], piece)
            done[0].synchronize()  # before the pinned view can be handed to anyone else

        def via_pageable():  # the pinned tier cannot hold it (now): read without the tier
            staging = torch.empty(entry.nbytes, dtype=torch.uint8)
            self._load_bytes(entry, staging)
            return copy_to_gpu(staging, device, out=out)

        try:
            loaded = self._ensure_cpu(entry, also=upload)
        except CapacityError:
            return via_pageable()
        if loaded:
            out.record_stream(torch.cuda.current_stream(device))
            return out, done[0]
        with self._lock:
            view = entry.cpu
            if view is not None:
                entry.busy += 1
        if view is None:  # dropped again already
            return via_pageable()
        return copy_to_gpu(view, device, after=lambda: self._release_reader(entry), out=out)

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            release_lock(self._lock_fd)
            self._lock_fd = None


def _unsettled(entry: Entry | None) -> bool:
    return entry is not None and (entry.writing or entry.suspect)


def _typed(raw: torch.Tensor, entry: Entry) -> torch.Tensor:
    return raw.view(entry.dtype).reshape(entry.shape)
