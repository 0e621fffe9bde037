"""The executor that streams a model's units (layers or single weight matrices) through the store.

Call order, per forward pass:
1. A forward pre-hook on unit ``u``'s module calls ``Scheduler.step(u)`` and runs the actions
   it returns. The executor owns the buffers: one pinned buffer per unit in flight or cached
   (from its own PinnedPool, the unit's keys at 4 KiB-aligned offsets) and one device buffer.
   READ -> ``store.pread(keys, views)`` (aio, disk -> the unit's pinned buffer, checksummed);
   COPY -> one host->device copy of the whole buffer on our copy stream (a copy thread waits
   for its event); READ_TO_GPU (no pinned budget) -> ``store.get(key, device)``; FREE_PINNED ->
   the pinned buffer back to the pool; FREE_GPU -> drop our reference (the caching allocator
   reuses the memory once the compute stream is past it: ``record_stream`` at bind time).
2. It waits until the scheduler says ``u`` is on the device (a condition variable, notified by
   the transfers' completion callbacks, which report ``done(id)`` and run the next actions).
3. It makes the compute stream wait on ``u``'s copy event and binds the unit's parameters to the
   device tensors (fp8 weights are dequantised here, on the compute stream).
4. A forward hook puts the meta parameters back, so nothing but the executor holds the copies.
No Python loop polls; every transfer's completion drives the next ones.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import torch

from infinity.errors import CapacityError
from infinity.inference.layout import TensorRecord
from infinity.io.pinned import PinnedPool
from infinity.schedule import COPY, FREE_GPU, FREE_PINNED, READ, READ_TO_GPU, Plan, Scheduler

log = logging.getLogger(__name__)
_NAMES = {READ: "read", COPY: "copy", FREE_PINNED: "free pinned", FREE_GPU: "free gpu",
          READ_TO_GPU: "read to gpu"}  # fmt: skip


@dataclass
class Slot:
    """One parameter of a unit: where it is bound and what is stored for it."""

    module: torch.nn.Module
    attr: str
    record: TensorRecord
    meta: torch.nn.Parameter  # put back after the unit's forward


@dataclass(frozen=True)
class Piece:
    """One stored tensor of a unit and where it sits in the unit's buffers."""

    record: TensorRecord
    offset: int  # bytes into the unit's buffer, 4 KiB-aligned

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        raw = buffer[self.offset : self.offset + self.record.nbytes]
        return raw.view(getattr(torch, self.record.dtype)).view(self.record.shape)


@dataclass
class StreamUnit:
    """What the scheduler calls one tensor: a module whose parameters move together."""

    name: str
    module: torch.nn.Module
    slots: list[Slot]
    pieces: list[Piece] = field(default_factory=list)  # weights, then fp8 scales
    nbytes: int = 0  # its buffer: the pieces, each starting aligned
    layer: int | None = None  # its decoder layer, None outside the layer list

    @property
    def keys(self) -> list[str]:
        return [p.record.key for p in self.pieces]

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each stored tensor, by key, as a view of the unit's ``buffer``."""
        return {p.record.key: p.view(buffer) for p in self.pieces}


def bind(slots: list[Slot], tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Point each slot's parameter at its tensor, in the compute dtype (fp8: w * scale)."""
    for slot in slots:
        t = tensors[slot.record.key]
        if slot.record.scale_key is not None:
            scale = tensors[slot.record.scale_key].to(dtype)
            t = t.to(dtype) * scale.view(-1, *([1] * (t.dim() - 1)))
        elif t.dtype != dtype and t.is_floating_point():
            t = t.to(dtype)
        slot.module._parameters[slot.attr] = torch.nn.Parameter(t, requires_grad=False)


def unbind(slots: list[Slot]) -> None:
    """Put the meta parameters back: nothing but the executor holds the device copies."""
    for slot in slots:
        slot.module._parameters[slot.attr] = slot.meta


class Streamer:
    """Runs a Plan over ``units``; attached to the model as ``model.infinity``."""

    def __init__(self, store, units, plan: Plan, device: torch.device, dtype, pinned_bytes: int):
        self.store, self.units, self.plan = store, units, plan
        self.device, self.dtype = device, dtype
        self._cuda = device.type == "cuda"
        self._cond = threading.Condition(threading.RLock())  # callbacks may run in our thread
        self._sched = Scheduler(plan)
        self._on_device: dict[int, tuple[dict[str, torch.Tensor], object]] = {}
        self._pool = PinnedPool(pinned_bytes) if pinned_bytes else None
        self._pinned: dict[int, tuple[torch.Tensor, bool]] = {}  # unit -> (buffer, from pool)
        self._error: BaseException | None = None
        self._started = self._closed = False
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="infinity-copy")
        self._reader = ThreadPoolExecutor(2, thread_name_prefix="infinity-direct")
        self._copy_stream = torch.cuda.Stream(device) if self._cuda else None
        self._stats = {"steps": 0, "stall_s": 0.0, "copy_s": 0.0, "copies": 0, "reads": 0,
                       "h2d_bytes": 0, "fallbacks": 0}  # fmt: skip
        self._store_start = store.stats()
        # (perf_counter, event, unit): the latest events, for diagnosis (generate runs long)
        self.timeline: deque[tuple[float, str, int]] = deque(maxlen=4096)
        for i, unit in enumerate(units):
            unit.module.register_forward_pre_hook(partial(self._enter, i))
            unit.module.register_forward_hook(partial(self._leave, i))

    # -- the hooks (compute thread) ---------------------------------------------------------------
    def _enter(self, i: int, module, args) -> None:
        start = time.perf_counter()
        with self._cond:
            if self._closed:
                raise RuntimeError("this streamed model was closed (model.infinity.close())")
            self._begin()
            self.timeline.append((time.perf_counter(), "step", i))
            self._run(self._sched.step(i))
            self._cond.wait_for(lambda: self._error is not None or self._sched.on_gpu(i))
            if self._error is not None:
                raise self._error
            tensors, ready = self._on_device[i]
        self._stats["stall_s"] += time.perf_counter() - start
        self.timeline.append((time.perf_counter(), "ready", i))
        self._stats["steps"] += 1
        if ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            for t in tensors.values():
                t.record_stream(stream)  # freed early by us: not reused before compute is past
        bind(self.units[i].slots, tensors, self.dtype)

    def start_with(self, model: torch.nn.Module) -> None:
        """Begin the first reads as soon as ``model``'s forward begins (its embeddings, the
        first CUDA calls and their lazy initialisation then overlap the disk)."""
        model.register_forward_pre_hook(lambda module, args: self._begin())

    def _begin(self) -> None:
        with self._cond:
            if not self._started and not self._closed:
                self._started = True
                self._run(self._sched.start())

    def _leave(self, i: int, module, args, output) -> None:
        unbind(self.units[i].slots)

    # -- actions (under the lock) -----------------------------------------------------------------
    def _run(self, actions) -> None:
        for a in actions:
            unit = self.units[a.tensor]
            self.timeline.append((time.perf_counter(), _NAMES[a.kind], a.tensor))
            if a.kind == READ:
                self._stats["reads"] += 1
                buffer = self._host_buffer(unit)
                self._pinned[a.tensor] = buffer
                future = self.store.pread(unit.keys, [p.view(buffer[0]) for p in unit.pieces])
                future.add_done_callback(partial(self._finished, a))
            elif a.kind == COPY:
                host = self._pinned[a.tensor][0]
                self._copier.submit(self._copy, unit, host).add_done_callback(
                    partial(self._finished, a)
                )
            elif a.kind == READ_TO_GPU:
                self._reader.submit(self._direct, unit).add_done_callback(
                    partial(self._finished, a)
                )
            elif a.kind == FREE_PINNED:
                buffer, pooled = self._pinned.pop(a.tensor)
                if pooled:
                    self._pool.free(buffer)
            elif a.kind == FREE_GPU:
                self._on_device.pop(a.tensor, None)

    def _host_buffer(self, unit: StreamUnit) -> tuple[torch.Tensor, bool]:
        """The unit's pinned buffer; pageable memory (slower copies) if the pool cannot."""
        try:
            if self._pool is not None:
                return self._pool.alloc(unit.nbytes), True
        except CapacityError as exc:
            if not self._stats["fallbacks"]:
                log.warning("pinned pool: %s; staging %s in pageable memory", exc, unit.name)
        self._stats["fallbacks"] += 1
        return torch.empty(unit.nbytes, dtype=torch.uint8), False

    def _copy(self, unit: StreamUnit, host: torch.Tensor):
        """Copy thread: the unit's pinned buffer to the device in one copy."""
        start = time.perf_counter()
        ready = None
        if not self._cuda:
            buffer = host.clone()
        else:
            with torch.cuda.stream(self._copy_stream):
                buffer = torch.empty(unit.nbytes, dtype=torch.uint8, device=self.device)
                buffer.copy_(host, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self._copy_stream)
            ready.synchronize()  # the pinned buffer may be freed or refilled after this
        self._stats["copy_s"] += time.perf_counter() - start
        self._stats["copies"] += 1
        self._stats["h2d_bytes"] += unit.nbytes
        return unit.views(buffer), ready

    def _direct(self, unit: StreamUnit):
        """No pinned budget: each key from disk to the device through the store."""
        if not self._cuda:
            return {k: self.store.get(k, device=self.device) for k in unit.keys}, None
        with torch.cuda.stream(self._copy_stream):  # get() makes this stream wait
            tensors = {k: self.store.get(k, device=self.device) for k in unit.keys}
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        return tensors, ready

    def _finished(self, action, future: Future) -> None:
        with self._cond:
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
            try:
                self._run(self._sched.done(action.id))
            except BaseException as exc:  # noqa: BLE001 (handed to the compute thread)
                self._error = exc
            self._cond.notify_all()

    # -- public -----------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Steps, bytes moved, time waited; ``peak_gpu_bytes`` is torch's peak allocation."""
        now, first = self.store.stats(), self._store_start
        gpu, pinned = self.plan.resident_gpu, self.plan.resident_pinned  # kept across passes
        out = dict(self._stats)
        out.update(
            disk_bytes=now.disk_read_bytes - first.disk_read_bytes,
            disk_s=now.disk_read_s - first.disk_read_s,
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
        """Stop streaming, wait for transfers in flight, close the store."""
        with self._cond:
            if self._closed:
                return
            self._closed = True  # the hooks stay: a later forward says the model is closed
        self._copier.shutdown(wait=True)
        self._reader.shutdown(wait=True)
        self.store.close()  # waits for its reads
        self._on_device.clear()
        for buffer, pooled in self._pinned.values():
            if pooled:
                self._pool.free(buffer)
        self._pinned.clear()
        if self._pool is not None:
            self._pool.close()
