"""Executor: runs a plan (schedule.py) over units, the one owner of what is resident where.

Call order, per pass of a driver (inference hooks, the optimizer, training streaming):
1. ``acquire(i)`` when unit ``i`` is about to be used: it tells the scheduler "step i" and runs
   the actions it returns, then waits until the scheduler says ``i`` is on the device (a
   condition variable, notified by the transfers' completion callbacks, which report
   ``done(id)`` and run the next actions; no Python loop polls). It makes the caller's stream
   wait on the unit's copy event and returns the unit's tensors, views of one device buffer.
2. ``release(i, dirty=...)`` when the driver is done with them: clean, or dirty (the driver
   wrote new contents into the views; the plan must have marked that step as writing). The
   scheduler then copies a dirty unit back (COPY_BACK: device -> a pinned buffer, on the d2h
   copy stream, after the caller's stream) and writes it (WRITE: ``store.pwrite``, in place)
   unless the plan keeps it pinned, where it stays dirty until ``flush``.
3. ``flush()``: every dirty unit reaches NVMe and the store commits.
4. Optionally ``redirect(keys)`` after a flush: from then on unit ``i`` is written under
   ``keys[i]`` and read back from there once written, so that the flushed state stays intact
   on disk while the next one is written beside it (OffloadedAdamW's two checkpoint slots).
   The views a driver gets stay named by the unit's own piece keys.

Actions: READ -> ``store.pread(keys, views)`` (aio, disk -> the unit's pinned buffer,
checksummed); COPY -> one host->device copy of the whole buffer (runtime.copy on the h2d copy
stream; a copy thread waits for its event); READ_TO_GPU (no pinned budget) -> ``store.get(key,
device)``; COPY_BACK / WRITE as above; FREE_PINNED -> the pinned buffer back to the pool;
FREE_GPU -> drop our reference (the caching allocator reuses the memory once the compute stream
is past it: ``record_stream`` at acquire). The pinned buffers come from the process's one
PinnedPool, passed in by whoever built the store; the executor knows nothing of models.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import torch

from infinity.errors import CapacityError, ConfigError, InfinityError
from infinity.io import PinnedPool, copy, copy_stream
from infinity.runtime.units import Unit
from infinity.schedule import (
    COPY,
    COPY_BACK,
    FREE_GPU,
    FREE_PINNED,
    READ,
    READ_TO_GPU,
    WRITE,
    Plan,
    Scheduler,
)

log = logging.getLogger(__name__)
_NAMES = {READ: "read", COPY: "copy", FREE_PINNED: "free pinned", FREE_GPU: "free gpu",
          READ_TO_GPU: "read to gpu", COPY_BACK: "copy back", WRITE: "write"}  # fmt: skip


class Executor:
    """See the module docstring. ``pool``: the process's PinnedPool (None: no pinned memory,
    units go disk -> device through the store); the executor does not close it."""

    def __init__(self, store, units: list[Unit], plan: Plan, device, pool: PinnedPool | None):
        self.store, self.units, self.plan = store, units, plan
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._cond = threading.Condition(threading.RLock())  # callbacks may run in our thread
        self._sched = Scheduler(plan)
        # store keys of each unit's pieces: where its newest bytes are, where they go next
        self._read_keys = [u.keys for u in units]
        self._write_keys = [u.keys for u in units]
        # unit -> (device buffer, its views, the event its copy recorded)
        self._on_device: dict[int, tuple[torch.Tensor | None, dict, object]] = {}
        self._pool = pool
        self._pinned: dict[int, tuple[torch.Tensor, bool]] = {}  # unit -> (buffer, from pool)
        self._dirty: dict[int, object] = {}  # released dirty: unit -> event after its writes
        # CPU device: a unit's "device" copy is its pinned buffer itself (no copy); a pinned
        # buffer the plan frees while its unit is still on the device is freed with it, and a
        # unit being written to disk is handed to the driver only once that write is done
        self._kept: dict[int, tuple[torch.Tensor, bool]] = {}
        self._disk_writes: set[int] = set()
        self._writing: set[int] = set()  # acquired with write=True, not yet released
        self._inflight = 0
        self._error: BaseException | None = None
        self._started = self._closed = False
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="infinity-copy")
        self._reader = ThreadPoolExecutor(2, thread_name_prefix="infinity-direct")
        self._stats = {"steps": 0, "stall_s": 0.0, "copy_s": 0.0, "copies": 0, "reads": 0,
                       "h2d_bytes": 0, "d2h_bytes": 0, "writes": 0, "fallbacks": 0}  # fmt: skip
        self._store_start = store.stats()
        # (perf_counter, event, unit): the latest events, for diagnosis (generate runs long)
        self.timeline: deque[tuple[float, str, int]] = deque(maxlen=4096)

    # -- the driver's calls (compute thread) --------------------------------------------------
    def start(self) -> None:
        """Begin the first reads (acquire does it too; a driver may call this earlier, so that
        the disk starts while the device does other work)."""
        with self._cond:
            if not self._started and not self._closed:
                self._started = True
                self._run(self._sched.start())

    def acquire(self, i: int, write: bool = False) -> dict[str, torch.Tensor]:
        """Unit ``i``'s tensors on the device, once there; ``write``: this use may change
        them (then ``release(i, dirty=True)`` sends them back)."""
        start = time.perf_counter()
        with self._cond:
            if self._closed:
                raise InfinityError("this executor was closed")
            self.start()
            self.timeline.append((time.perf_counter(), "step", i))
            self._run(self._sched.step(i, writes=True if write else None))
            if write:
                self._writing.add(i)
            self._cond.wait_for(
                lambda: self._error is not None
                or (self._sched.on_gpu(i) and (self._cuda or i not in self._disk_writes))
            )
            self._raise()
            _, views, ready = self._on_device[i]
        self._stats["stall_s"] += time.perf_counter() - start
        self.timeline.append((time.perf_counter(), "ready", i))
        self._stats["steps"] += 1
        if ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            for t in views.values():
                t.record_stream(stream)  # freed early by us: not reused before compute is past
        return views

    def release(self, i: int, dirty: bool = False) -> None:
        """The driver is done with unit ``i``; ``dirty``: it wrote new contents into its views,
        which the plan's write-back takes to pinned memory and NVMe."""
        with self._cond:
            writing = i in self._writing
            self._writing.discard(i)
        if not dirty:
            return
        if not writing:
            raise ConfigError(
                f"unit {i} ({self.units[i].name}) released dirty but acquired without "
                "write=True: the scheduler plans the write-back when the step begins"
            )
        event = None
        if self._cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        with self._cond:
            self._dirty[i] = event

    def finish(self) -> None:
        """End of a pass: the last step is over (its dirty unit can be copied back)."""
        with self._cond:
            self._run(self._sched.finish())

    def flush(self) -> None:
        """Every unit released dirty is on NVMe and the store has committed it."""
        with self._cond:
            self._run(self._sched.flush())
            self._cond.wait_for(
                lambda: self._error is not None or (self._inflight == 0 and self._sched.flushed())
            )
            self._raise()
        self.store.flush()

    def redirect(self, keys: list[list[str]], stored: list[list[str]] | None = None) -> None:
        """Write unit ``i`` under ``keys[i]`` (one store key per piece, in order) from now on,
        and read it from there once written. Only between passes, with nothing dirty (after
        ``flush``): a unit's bytes are then all in the keys it is read from. ``stored``: where
        each unit is read from until written, only before the first pass (nothing read yet)."""
        with self._cond:
            for lists in (keys, stored or self._read_keys):
                if len(lists) != len(self.units) or any(
                    len(k) != len(u.pieces) for k, u in zip(lists, self.units, strict=True)
                ):
                    raise ConfigError("redirect: a list of store keys per unit, one per piece")
            if self._dirty or self._writing or not self._sched.flushed():
                raise ConfigError("redirect with units still dirty: flush() first")
            if stored is not None:
                if self._started:
                    raise ConfigError("redirect(stored=) after the executor started reading")
                self._read_keys = [list(k) for k in stored]
            self._write_keys = [list(k) for k in keys]

    def stored_keys(self, i: int) -> list[str]:
        """The store keys unit ``i``'s newest bytes are read from (after a flush: on disk)."""
        with self._cond:
            return list(self._read_keys[i])

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    # -- actions (under the lock) -------------------------------------------------------------
    def _run(self, actions) -> None:
        for a in actions:
            unit = self.units[a.tensor]
            self.timeline.append((time.perf_counter(), _NAMES[a.kind], a.tensor))
            if a.kind == READ:
                self._stats["reads"] += 1
                buffer = self._host_buffer(unit)
                self._pinned[a.tensor] = buffer
                views = list(unit.views(buffer[0]).values())
                future = self.store.pread(self._read_keys[a.tensor], views)
                self._track(a, future)
            elif a.kind == COPY:
                self._track(a, self._copier.submit(self._copy_in, unit, self._pinned[a.tensor][0]))
            elif a.kind == READ_TO_GPU:
                job = partial(self._direct, unit, self._read_keys[a.tensor])
                self._track(a, self._reader.submit(job))
            elif a.kind == COPY_BACK:
                if a.tensor not in self._pinned:
                    kept = self._kept.pop(a.tensor, None)  # the device copy's own memory
                    self._pinned[a.tensor] = kept or self._host_buffer(unit)
                job = partial(self._copy_back, a.tensor, self._pinned[a.tensor][0])
                self._track(a, self._copier.submit(job))
            elif a.kind == WRITE:
                self._stats["writes"] += 1
                host = self._pinned[a.tensor][0]
                keys = self._read_keys[a.tensor] = self._write_keys[a.tensor]
                self._disk_writes.add(a.tensor)
                future = self.store.pwrite(keys, list(unit.views(host).values()))
                self._track(a, future)
            elif a.kind == FREE_PINNED:
                buffer, pooled = self._pinned.pop(a.tensor)
                on_device = self._on_device.get(a.tensor)
                if on_device is not None and on_device[0] is buffer:  # CPU: still in use
                    self._kept[a.tensor] = (buffer, pooled)
                elif pooled:
                    self._pool.free(buffer)
            elif a.kind == FREE_GPU:
                self._on_device.pop(a.tensor, None)
                buffer, pooled = self._kept.pop(a.tensor, (None, False))
                if pooled:
                    self._pool.free(buffer)

    def _track(self, action, future: Future) -> None:
        self._inflight += 1
        future.add_done_callback(partial(self._finished, action))

    def _host_buffer(self, unit: Unit) -> tuple[torch.Tensor, bool]:
        """The unit's pinned buffer; pageable memory (slower copies) if the pool cannot."""
        try:
            if self._pool is not None:
                return self._pool.alloc(unit.nbytes), True
        except CapacityError as exc:
            if not self._stats["fallbacks"]:
                log.warning("pinned pool: %s; staging %s in pageable memory", exc, unit.name)
        self._stats["fallbacks"] += 1
        return torch.empty(unit.nbytes, dtype=torch.uint8), False

    def _copy_in(self, unit: Unit, host: torch.Tensor):
        """Copy thread: the unit's pinned buffer to the device in one copy."""
        start = time.perf_counter()
        if self._cuda:
            buffer = torch.empty(unit.nbytes, dtype=torch.uint8, device=self.device)
            ready = copy(buffer, host)
            ready.synchronize()  # the pinned buffer may be freed or refilled after this
        else:  # the CPU works on the pinned buffer itself (FREE_PINNED waits for FREE_GPU)
            buffer, ready = host, None
        self._stats["copy_s"] += time.perf_counter() - start
        self._stats["copies"] += 1
        self._stats["h2d_bytes"] += unit.nbytes
        return buffer, unit.views(buffer), ready

    def _copy_back(self, i: int, host: torch.Tensor) -> None:
        """Copy thread: a unit's device buffer into its pinned buffer, after the driver's stream
        is past its writes (released clean, the copy is of unchanged contents: still right)."""
        with self._cond:
            after = self._dirty.pop(i, None)
            buffer, views, _ = self._on_device[i]
        event = None
        if buffer is None:  # reached the device as separate tensors (READ_TO_GPU)
            for piece in self.units[i].pieces:
                event = copy(piece.view(host), views[piece.key], after=after)
        elif buffer is not host:  # (on the CPU the device copy is the pinned buffer itself)
            event = copy(host, buffer, after=after)
        if event is not None:
            event.synchronize()
        self._stats["d2h_bytes"] += self.units[i].nbytes

    def _direct(self, unit: Unit, stored: list[str]):
        """No pinned budget: each key from disk to the device through the store."""

        def get_all():
            pairs = zip(unit.keys, stored, strict=True)
            return {k: self.store.get(s, device=self.device) for k, s in pairs}

        if not self._cuda:
            return None, get_all(), None
        stream = copy_stream(self.device)
        with torch.cuda.stream(stream):  # get() makes this stream wait
            tensors = get_all()
            ready = torch.cuda.Event()
            ready.record(stream)
        return None, tensors, ready

    def _finished(self, action, future: Future) -> None:
        with self._cond:
            self._inflight -= 1
            self.timeline.append(
                (time.perf_counter(), _NAMES[action.kind] + " done", action.tensor)
            )
            error = future.exception()
            if error is not None:
                self._error = error
                self._cond.notify_all()
                return
            if action.kind in (COPY, READ_TO_GPU):
                self._on_device[action.tensor] = future.result()
            elif action.kind == WRITE:
                self._disk_writes.discard(action.tensor)
            try:
                self._run(self._sched.done(action.id))
            except BaseException as exc:  # noqa: BLE001 (handed to the compute thread)
                self._error = exc
            self._cond.notify_all()

    # -- public -------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Steps, bytes moved, time waited; ``peak_gpu_bytes`` is torch's peak allocation."""
        now, first = self.store.stats(), self._store_start
        gpu, pinned = self.plan.resident_gpu, self.plan.resident_pinned  # kept across passes
        out = dict(self._stats)
        out.update(
            disk_bytes=now.disk_read_bytes - first.disk_read_bytes,
            disk_s=now.disk_read_s - first.disk_read_s,
            disk_write_bytes=now.disk_write_bytes - first.disk_write_bytes,
            scheduler=self._sched.stats(),
            units=len(self.units),
            plan=repr(self.plan),
            resident_gpu_bytes=sum(self.units[i].nbytes for i in gpu),
            resident_pinned_bytes=sum(self.units[i].nbytes for i in pinned - gpu),
        )
        if self._cuda:
            out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return out

    def close(self) -> None:
        """Stop, wait for transfers in flight, give the pinned buffers back (not the pool, not
        the store: their owner closes them)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.wait_for(lambda: self._inflight == 0)
        self._copier.shutdown(wait=True)
        self._reader.shutdown(wait=True)
        self._on_device.clear()
        for buffer, pooled in [*self._pinned.values(), *self._kept.values()]:
            if pooled:
                self._pool.free(buffer)
        self._pinned.clear()
        self._kept.clear()
