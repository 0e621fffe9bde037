"""The store's two memory tiers above NVMe: pinned CPU and GPU, byte budgets, an opt-in cache
for direct users of TieredStore (get/put/prefetch). Streamed models and training do not use
them: the runtime executor owns residency there, from a plan.

Replacement policy: when a tier is full, drop the copy used most recently (MRU) among those
nobody is reading. Under a cyclic
scan larger than the tier (a forward pass, an optimizer step) MRU keeps a fixed subset resident,
so each pass hits about capacity / working set, where LRU (the page cache) hits about 0%.
The NVMe copy is never dropped: both tiers hold clean copies only (puts write through).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

import torch

from infinity.config import format_size
from infinity.errors import CapacityError
from infinity.io import PinnedPool, copy, copy_stream
from infinity.store.manifest import Entry

_clock = itertools.count(1)


def touch(entry: Entry, tier: str) -> None:
    entry.last_used[tier] = next(_clock)


class Tier:
    """Bookkeeping shared by both tiers: members, MRU victims."""

    name = ""

    def __init__(self, budget_bytes: int, lock: threading.RLock):
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.members: dict[str, Entry] = {}
        self.lock = lock  # the store's lock

    def victims(self, protect: Entry) -> list[Entry]:
        candidates = [
            e
            for k, e in self.members.items()
            if e is not protect and not (self.name == "cpu" and e.busy)
        ]
        return sorted(candidates, key=lambda e: e.last_used.get(self.name, 0), reverse=True)

    def drop(self, entry: Entry) -> None:
        raise NotImplementedError

    def enter(self, entry: Entry) -> None:
        """Count ``entry`` as resident here (caller holds the lock)."""
        self.members[entry.key] = entry
        self.used_bytes += entry.nbytes
        touch(entry, self.name)

    def leave(self, entry: Entry) -> None:
        """Stop counting ``entry`` here (caller holds the lock); its copy is the caller's."""
        if self.members.pop(entry.key, None) is not None:
            self.used_bytes -= entry.nbytes

    def full_error(self, entry: Entry, what: str) -> CapacityError:
        return CapacityError(
            f"{self.name} tier cannot fit {entry.key!r} ({format_size(entry.nbytes)}): "
            f"{format_size(self.used_bytes)} of {format_size(self.budget_bytes)} in use by "
            f"{len(self.members)} tensors that are held or being read ({what}); raise "
            f"StoreConfig.{'pinned_bytes' if self.name == 'cpu' else 'gpu_bytes'} or evict keys"
        )


class PinnedTier(Tier):
    name = "cpu"

    def __init__(self, budget_bytes: int, lock: threading.RLock, pool: PinnedPool | None = None):
        super().__init__(budget_bytes, lock)
        self._own_pool = pool is None
        self.pool = pool if pool is not None else PinnedPool(budget_bytes) if budget_bytes else None
        self.changed = threading.Condition(lock)  # a load finished or a reader let go
        self.inflight = 0  # loads holding a view that is not admitted yet
        self.inflight_bytes = 0

    def allocate(self, entry: Entry) -> torch.Tensor:
        """A pinned view for ``entry`` (caller holds the lock), dropping MRU copies as needed;
        waits for loads and readers in flight before giving up."""
        if self.pool is None or not self.budget_bytes or entry.nbytes > self.budget_bytes:
            raise self.full_error(entry, "too large for the tier")
        while True:
            try:
                if self.used_bytes + self.inflight_bytes + entry.nbytes > self.budget_bytes:
                    raise CapacityError("over the tier's budget")  # (a shared pool has room)
                view = self.pool.alloc(entry.nbytes)
                self.inflight += 1
                self.inflight_bytes += entry.nbytes
                return view
            except CapacityError:
                victims = self.victims(entry)
                if victims:
                    self.drop(victims[0])
                elif self.inflight or any(e.busy for e in self.members.values()):
                    self.changed.wait(timeout=1.0)
                else:
                    raise self.full_error(entry, "nothing left to drop") from None

    def settle(self, entry: Entry, view: torch.Tensor, admit: bool) -> None:
        """End of a load (caller holds the lock): admit the view or give it back."""
        self.inflight -= 1
        self.inflight_bytes -= entry.nbytes
        if admit:
            self.admit(entry, view)
        else:
            self.pool.free(view)
        self.changed.notify_all()

    def admit(self, entry: Entry, view: torch.Tensor) -> None:
        entry.cpu = view
        self.enter(entry)

    def drop(self, entry: Entry) -> None:
        if entry.cpu is None:
            return
        self.pool.free(entry.cpu)
        entry.cpu = None
        self.leave(entry)

    def close(self) -> None:
        for entry in list(self.members.values()):
            self.drop(entry)
        if self.pool is not None and self._own_pool:
            self.pool.close()


class GpuTier(Tier):
    name = "gpu"

    def make_room(self, entry: Entry) -> None:
        if entry.nbytes > self.budget_bytes:
            raise self.full_error(entry, "too large for the tier")
        victims = self.victims(entry)
        while self.used_bytes + entry.nbytes > self.budget_bytes:
            if not victims:
                raise self.full_error(entry, "nothing left to drop")
            self.drop(victims.pop(0))

    def admit(self, entry: Entry, tensor: torch.Tensor, ready) -> None:
        entry.gpu, entry.gpu_ready = tensor, ready
        self.enter(entry)

    def drop(self, entry: Entry) -> None:
        if entry.gpu is None:
            return
        entry.gpu, entry.gpu_ready = None, None  # callers' references keep their memory alive
        self.leave(entry)

    def close(self) -> None:
        for entry in list(self.members.values()):
            self.drop(entry)


def copy_to_gpu(
    host: torch.Tensor,
    device: torch.device,
    after: Callable[[], None] | None = None,
    out: torch.Tensor | None = None,
):
    """Copy a uint8 host buffer to a GPU tensor (``out``, or a new one) with io.copy (the
    device's h2d copy stream); asynchronous when ``host`` is pinned.

    Returns (tensor, event). ``after`` runs once the copy has finished reading ``host``."""
    if out is None:
        with torch.cuda.stream(copy_stream(device)):
            out = torch.empty(host.numel(), dtype=torch.uint8, device=device)
    event = copy(out, host)
    # the caller's stream will use `out`: tell the caching allocator
    out.record_stream(torch.cuda.current_stream(device))
    if after is not None:
        event.synchronize()
        after()
    return out, event
