"""Slow, obviously-correct references for the scheduler tests.

- ``Replay`` drives a Scheduler through a sequence of steps, completing the transfers in flight in
  an order chosen by the caller, and checks every action against plain bookkeeping: at most one
  buffer per tensor per tier, budgets never exceeded, a copy only from a pinned buffer whose read
  is done, no buffer freed while a transfer or the current step uses it, every step's tensor on
  the GPU before it computes, and no read or copy of a tensor already held in that tier.
  With writes it also tracks a version per tensor (the step that last wrote it): every step
  computes on the newest version, nothing is read from disk unless the disk has the newest
  version (and no write of it is in flight), no copy-back overlaps a step writing its tensor,
  no buffer is freed while it alone holds the newest version, and after ``flush`` the disk holds
  every tensor's newest version.
- ``optimal_disk_bytes`` finds, by exhaustive search over every caching decision, the fewest bytes
  any policy with the same cache capacities must read from disk for a trace.
"""

from __future__ import annotations

import functools
import itertools

from infinity.schedule import (
    COPY,
    COPY_BACK,
    FREE_GPU,
    FREE_PINNED,
    READ,
    READ_TO_GPU,
    WRITE,
    Scheduler,
)


class Stuck(AssertionError):
    pass


class Replay:
    def __init__(self, p, pick=lambda inflight: 0, during_compute=lambda n: n):
        self.p, self.pick, self.during_compute = p, pick, during_compute
        self.sched = Scheduler(p)
        # tensor -> {"nbytes", "ready", "users", "version", "writing"}; "ready" is False while a
        # read or copy-back fills it, "users" counts copies reading it
        self.pinned: dict[int, dict] = {}
        self.gpu: dict[int, dict] = {}  # tensor -> {"nbytes", "ready", "version", "readers"}
        self.inflight: list = []  # (action, version it carries) not yet done
        self.current: int | None = None
        self.current_writes = False
        self.disk_bytes = 0
        self.reads: list[tuple[int, int]] = []  # (tensor, step) of every read
        self.peak_gpu = self.peak_pinned = 0
        self.latest: dict[int, int] = {}  # tensor -> newest version (0: as on disk at start)
        self.disk: dict[int, int] = {}  # tensor -> version on disk
        self.version = 0
        self.write_bytes = 0

    def used(self, tier: dict) -> int:
        return sum(b["nbytes"] for b in tier.values())

    def newest(self, x: int) -> int:
        return self.latest.get(x, 0)

    def in_flight(self, kind: int, x: int) -> bool:
        return any(a.kind == kind and a.tensor == x for a, _ in self.inflight)

    def held_elsewhere(self, x: int, tier: dict) -> bool:
        """The newest version of x survives without `tier`'s buffer."""
        other = self.pinned if tier is self.gpu else self.gpu
        buf = other.get(x)
        return self.disk.get(x, 0) == self.newest(x) or (
            buf is not None and buf["version"] == self.newest(x)
        )

    def read_from_disk(self, a) -> int:
        x = a.tensor
        assert self.disk.get(x, 0) == self.newest(x), (
            f"read of {x} from disk holding version {self.disk.get(x, 0)}, newest is "
            f"{self.newest(x)}"
        )
        assert not self.in_flight(WRITE, x), f"read of {x} while its write is in flight"
        self.disk_bytes += a.nbytes
        self.reads.append((x, a.step))
        return self.disk.get(x, 0)

    def apply(self, actions) -> None:
        for a in actions:
            x, carried = a.tensor, None
            if a.kind == READ:
                assert x not in self.pinned, f"read of {x} already in pinned memory"
                carried = self.read_from_disk(a)
                self.pinned[x] = {"nbytes": a.nbytes, "ready": False, "users": 0,
                                  "version": carried, "writing": False}  # fmt: skip
            elif a.kind == READ_TO_GPU:
                assert x not in self.gpu, f"read of {x} already on the GPU"
                carried = self.read_from_disk(a)
                self.gpu[x] = {"nbytes": a.nbytes, "ready": False, "version": carried,
                               "readers": 0}  # fmt: skip
            elif a.kind == COPY:
                assert x not in self.gpu, f"copy of {x} already on the GPU"
                src = self.pinned.get(x)
                assert src is not None and src["ready"], f"copy of {x} before its read"
                src["users"] += 1
                carried = src["version"]
                self.gpu[x] = {"nbytes": a.nbytes, "ready": False, "version": carried,
                               "readers": 0}  # fmt: skip
            elif a.kind == COPY_BACK:
                src = self.gpu.get(x)
                assert src is not None and src["ready"], f"copy-back of {x}, not on the GPU"
                assert not (x == self.current and self.current_writes), (
                    f"copy-back of {x} while the step computing on it writes it"
                )
                dst = self.pinned.get(x)
                if dst is None:
                    dst = self.pinned[x] = {"nbytes": a.nbytes, "users": 0, "writing": False,
                                            "version": None}  # fmt: skip
                else:
                    assert dst["ready"] and dst["users"] == 0 and not dst["writing"], (
                        f"copy-back of {x} into a pinned buffer that is being read or filled"
                    )
                dst["ready"] = False
                src["readers"] += 1
                carried = src["version"]
            elif a.kind == WRITE:
                src = self.pinned.get(x)
                assert src is not None and src["ready"], f"write of {x} from no pinned data"
                assert not src["writing"], f"two writes of {x} at once"
                assert not self.in_flight(READ, x) and not self.in_flight(READ_TO_GPU, x)
                src["writing"] = True
                carried = src["version"]
                self.write_bytes += a.nbytes
            elif a.kind == FREE_PINNED:
                buf = self.pinned.get(x)
                assert buf is not None, f"free of {x}'s pinned buffer, which it lacks"
                assert buf["ready"] and buf["users"] == 0, f"pinned {x} freed while in use"
                assert not buf["writing"], f"pinned {x} freed while its write runs"
                assert buf["version"] != self.newest(x) or self.held_elsewhere(x, self.pinned), (
                    f"pinned {x} freed holding the only copy of version {self.newest(x)}"
                )
                del self.pinned[x]
            elif a.kind == FREE_GPU:
                buf = self.gpu.get(x)
                assert buf is not None, f"free of {x}'s GPU buffer, which it lacks"
                assert buf["ready"], f"GPU buffer of {x} freed while its copy runs"
                assert buf["readers"] == 0, f"GPU buffer of {x} freed while copied back"
                assert x != self.current, f"GPU buffer of {x} freed during its step"
                assert buf["version"] != self.newest(x) or self.held_elsewhere(x, self.gpu), (
                    f"GPU {x} freed holding the only copy of version {self.newest(x)}"
                )
                del self.gpu[x]
            else:
                raise AssertionError(f"unknown action kind {a.kind}")
            if a.id >= 0:
                self.inflight.append((a, carried))
        self.peak_gpu = max(self.peak_gpu, self.used(self.gpu))
        self.peak_pinned = max(self.peak_pinned, self.used(self.pinned))
        assert self.used(self.gpu) <= self.p.gpu_bytes, "GPU budget exceeded"
        assert self.used(self.pinned) <= self.p.pinned_bytes, "pinned budget exceeded"

    def complete_one(self) -> None:
        if not self.inflight:
            raise Stuck(f"step needing {self.current}: nothing in flight and it is not on the GPU")
        a, carried = self.inflight.pop(self.pick(self.inflight) % len(self.inflight))
        x = a.tensor
        if a.kind == READ:
            self.pinned[x]["ready"] = True
        elif a.kind in (READ_TO_GPU, COPY):
            self.gpu[x]["ready"] = True
            if a.kind == COPY:
                self.pinned[x]["users"] -= 1
        elif a.kind == COPY_BACK:
            self.gpu[x]["readers"] -= 1
            self.pinned[x].update(ready=True, version=carried)
        elif a.kind == WRITE:
            self.pinned[x]["writing"] = False
            self.disk[x] = carried
        self.apply(self.sched.done(a.id))

    def run(self, steps, writes=None, tell=True, flush_at=()) -> None:
        """Run `steps`; `writes[k]`: step k writes its tensor (told to the scheduler when `tell`,
        else the plan must say so); after the steps in `flush_at`, flush (and go on)."""
        self.apply(self.sched.start())
        for k, x in enumerate(steps):
            writing = bool(writes[k]) if writes is not None else False
            self.current = None  # the previous step is over
            self.apply(self.sched.step(x, writing if tell else None))
            while not self.sched.on_gpu(x):
                self.complete_one()
            buf = self.gpu.get(x)
            assert buf is not None and buf["ready"], f"on_gpu({x}) with no GPU copy"
            assert buf["version"] == self.newest(x), (
                f"step {k} computes on version {buf['version']} of {x}, newest {self.newest(x)}"
            )
            assert not (writing and buf["readers"]), f"step {k} writes {x} while copied back"
            self.current, self.current_writes = x, writing  # computing: transfers go on
            if writing:
                self.version += 1
                self.latest[x] = buf["version"] = self.version
            for _ in range(self.during_compute(len(self.inflight))):
                self.complete_one()
            if k in flush_at:
                self.current = None
                self.apply(self.sched.flush())

    def flush(self) -> None:
        """End the last step, flush, and complete everything: the disk holds every newest
        version, whatever order the transfers finish in."""
        self.current = None
        self.apply(self.sched.flush())
        while self.inflight:
            self.complete_one()
        if not self.sched.flushed():
            raise Stuck("flush never completes: nothing in flight and dirty data left")
        for x, v in self.latest.items():
            assert self.disk.get(x, 0) == v, (
                f"disk holds version {self.disk.get(x)} of {x}, not {v}"
            )


def optimal_disk_bytes(sizes, trace, gpu_cache: int, pinned_cache: int) -> int:
    """Fewest disk bytes over every policy: after each access, keep any subsets that fit."""
    n = len(sizes)

    def subsets(items, cap):
        items = sorted(items)
        for r in range(len(items) + 1):
            for combo in itertools.combinations(items, r):
                if sum(sizes[i] for i in combo) <= cap:
                    yield frozenset(combo)

    @functools.cache
    def best(t: int, gpu: frozenset, pinned: frozenset) -> int:
        if t == len(trace):
            return 0
        x = trace[t]
        cost = 0 if (x in gpu or x in pinned) else sizes[x]
        return cost + min(
            best(t + 1, g, p)
            for g in subsets(gpu | {x}, gpu_cache)
            for p in subsets(pinned | {x}, pinned_cache)
        )

    assert n <= 6 and len(trace) <= 12, "exhaustive search: keep it small"
    return best(0, frozenset(), frozenset())
