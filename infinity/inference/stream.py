"""The executor that streams a model's units (layers or single weight matrices) through the store.

Call order, per forward pass:
1. A forward pre-hook on unit ``u``'s module calls ``Scheduler.step(u)`` and runs the actions
   it returns: READ -> ``store.prefetch(keys, "cpu")`` (aio, disk -> pinned tier); COPY and
   READ_TO_GPU -> ``store.get(key, device)`` on a copy thread whose current stream is our copy
   stream, then an event; FREE_PINNED -> ``store.evict(key, "cpu")``; FREE_GPU -> drop our
   references (the caching allocator reuses the memory once the compute stream is past it).
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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import torch

from infinity.errors import CapacityError
from infinity.inference.layout import TensorRecord
from infinity.schedule import COPY, FREE_GPU, FREE_PINNED, READ, READ_TO_GPU, Plan, Scheduler

log = logging.getLogger(__name__)


@dataclass
class Slot:
    """One parameter of a unit: where it is bound and what is stored for it."""

    module: torch.nn.Module
    attr: str
    record: TensorRecord
    meta: torch.nn.Parameter  # put back after the unit's forward


@dataclass
class StreamUnit:
    """What the scheduler calls one tensor: a module whose parameters move together."""

    name: str
    module: torch.nn.Module
    slots: list[Slot]
    keys: list[str] = field(default_factory=list)  # store keys: weights, then fp8 scales
    nbytes: int = 0
    layer: int | None = None  # its decoder layer, None outside the layer list


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


class Streamer:
    """Runs a Plan over ``units``; attached to the model as ``model.infinity``."""

    def __init__(self, store, units: list[StreamUnit], plan: Plan, device: torch.device, dtype):
        self.store, self.units, self.plan = store, units, plan
        self.device, self.dtype = device, dtype
        self._cuda = device.type == "cuda"
        self._cond = threading.Condition(threading.RLock())  # callbacks may run in our thread
        self._sched = Scheduler(plan)
        self._on_device: dict[int, tuple[dict[str, torch.Tensor], object]] = {}
        self._error: BaseException | None = None
        self._started = self._closed = False
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="infinity-copy")
        self._reader = ThreadPoolExecutor(2, thread_name_prefix="infinity-direct")
        self._copy_stream = torch.cuda.Stream(device) if self._cuda else None
        self._stats = {"steps": 0, "stall_s": 0.0, "copy_s": 0.0, "copies": 0, "reads": 0}
        self._store_start = store.stats()
        self._hooks = []
        for i, unit in enumerate(units):
            self._hooks.append(unit.module.register_forward_pre_hook(partial(self._enter, i)))
            self._hooks.append(unit.module.register_forward_hook(partial(self._leave, i)))

    # -- the hooks (compute thread) ---------------------------------------------------------------
    def _enter(self, i: int, module, args) -> None:
        start = time.perf_counter()
        with self._cond:
            if self._closed:
                raise RuntimeError("this streamed model was closed (model.infinity.close())")
            if not self._started:
                self._started = True
                self._run(self._sched.start())
            self._run(self._sched.step(i))
            self._cond.wait_for(lambda: self._error is not None or self._sched.on_gpu(i))
            if self._error is not None:
                raise self._error
            tensors, ready = self._on_device[i]
        self._stats["stall_s"] += time.perf_counter() - start
        self._stats["steps"] += 1
        if ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            for t in tensors.values():
                t.record_stream(stream)  # freed early by us: not reused before compute is past
        bind(self.units[i].slots, tensors, self.dtype)

    def _leave(self, i: int, module, args, output) -> None:
        for slot in self.units[i].slots:
            slot.module._parameters[slot.attr] = slot.meta

    # -- actions (under the lock) -----------------------------------------------------------------
    def _run(self, actions) -> None:
        for a in actions:
            unit = self.units[a.tensor]
            if a.kind == READ:
                self._stats["reads"] += 1
                future = self.store.prefetch(unit.keys, tier="cpu")
                future.add_done_callback(partial(self._finished, a))
            elif a.kind in (COPY, READ_TO_GPU):
                pool = self._copier if a.kind == COPY else self._reader
                pool.submit(self._upload, unit).add_done_callback(partial(self._finished, a))
            elif a.kind == FREE_PINNED:
                for key in unit.keys:
                    self.store.evict(key, tier="cpu")
            elif a.kind == FREE_GPU:
                self._on_device.pop(a.tensor, None)

    def _upload(self, unit: StreamUnit):
        """Copy thread: the unit's tensors on the device (from the pinned tier, or from disk)."""
        start = time.perf_counter()
        if not self._cuda:
            tensors = {k: self.store.get(k, device=self.device) for k in unit.keys}
            ready = None
        else:
            with torch.cuda.stream(self._copy_stream):  # get() makes this stream wait
                tensors = {k: self.store.get(k, device=self.device) for k in unit.keys}
                ready = torch.cuda.Event()
                ready.record(self._copy_stream)
        self._stats["copy_s"] += time.perf_counter() - start
        self._stats["copies"] += 1
        return tensors, ready

    def _finished(self, action, future: Future) -> None:
        with self._cond:
            error = future.exception()
            if error is not None and not (isinstance(error, CapacityError) and action.kind == READ):
                self._error = error
                self._cond.notify_all()
                return
            if error is not None:  # the pinned tier is fragmented: the copy reads from disk
                log.warning("prefetch into the pinned tier failed (%s); reading at copy", error)
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
        out = dict(self._stats)
        out.update(
            disk_bytes=now.disk_read_bytes - first.disk_read_bytes,
            disk_s=now.disk_read_s - first.disk_read_s,
            h2d_bytes=now.h2d_bytes - first.h2d_bytes,
            scheduler=self._sched.stats(),
            units=len(self.units),
            plan=repr(self.plan),
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
        self.store.close()  # waits for its prefetches
        self._on_device.clear()
