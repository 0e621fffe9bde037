"""Streaming a model's units through the runtime executor: the module hooks that drive it.

Per forward pass: a forward pre-hook on unit ``u``'s module acquires ``u`` from the executor
(runtime/executor.py: the plan's reads and copies run ahead; acquire waits for ``u``'s copy and
makes the compute stream wait on it) and binds the unit's parameters to the device views (fp8
weights are dequantised here, on the compute stream); a forward hook puts the meta parameters
back, so nothing but the executor holds the device copies, and releases ``u`` (clean).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from infinity.inference.layout import TensorRecord
from infinity.runtime import Executor, Unit


@dataclass
class Slot:
    """One parameter of a unit: where it is bound and what is stored for it."""

    module: torch.nn.Module
    attr: str
    record: TensorRecord
    meta: torch.nn.Parameter  # put back after the unit's forward


@dataclass
class StreamUnit:
    """A runtime unit (its tensors in one buffer) and the module whose parameters they are."""

    unit: Unit
    module: torch.nn.Module
    slots: list[Slot]
    layer: int | None = None  # its decoder layer, None outside the layer list

    @property
    def name(self) -> str:
        return self.unit.name

    @property
    def nbytes(self) -> int:
        return self.unit.nbytes

    @property
    def keys(self) -> list[str]:
        return self.unit.keys

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.unit.views(buffer)


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
    """The hooks on ``units``' modules that drive ``executor``; attached to the model as
    ``model.infinity``. ``close`` closes the executor, then the store and the pinned pool that
    ``load`` opened for it."""

    def __init__(self, executor: Executor, units: list[StreamUnit], dtype, store, pool):
        self.executor, self.units, self.dtype = executor, units, dtype
        self.store, self._pool = store, pool
        self._closed = False
        for i, unit in enumerate(units):
            unit.module.register_forward_pre_hook(partial(self._enter, i))
            unit.module.register_forward_hook(partial(self._leave, i))

    @property
    def plan(self):
        return self.executor.plan

    @property
    def timeline(self):
        """(perf_counter, event, unit): the executor's latest events, for diagnosis."""
        return self.executor.timeline

    def _enter(self, i: int, module, args) -> None:
        if self._closed:
            raise RuntimeError("this streamed model was closed (model.infinity.close())")
        bind(self.units[i].slots, self.executor.acquire(i), self.dtype)

    def _leave(self, i: int, module, args, output) -> None:
        unbind(self.units[i].slots)
        self.executor.release(i)

    def start_with(self, model: torch.nn.Module) -> None:
        """Begin the first reads as soon as ``model``'s forward begins (its embeddings, the
        first CUDA calls and their lazy initialisation then overlap the disk)."""
        model.register_forward_pre_hook(lambda module, args: self.executor.start())

    def stats(self) -> dict:
        return self.executor.stats()

    def close(self) -> None:
        """Stop streaming, wait for transfers in flight, close the store and the pool."""
        if self._closed:
            return
        self._closed = True  # the hooks stay: a later forward says the model is closed
        try:
            self.executor.close()
        finally:
            self.store.close()  # waits for its reads
            if self._pool is not None:
                self._pool.close()
