"""Slow, obviously-correct references for the scheduler tests.

- ``Replay`` drives a Scheduler through a sequence of steps, completing the transfers in flight in
  an order chosen by the caller, and checks every action against plain bookkeeping: at most one
  buffer per tensor per tier, budgets never exceeded, a copy only from a pinned buffer whose read
  is done, no buffer freed while a transfer or the current step uses it, every step's tensor on
  the GPU before it computes, and no read or copy of a tensor already held in that tier.
- ``optimal_disk_bytes`` finds, by exhaustive search over every caching decision, the fewest bytes
  any policy with the same cache capacities must read from disk for a trace.
"""

from __future__ import annotations

import functools
import itertools

from infinity.schedule import COPY, FREE_GPU, FREE_PINNED, READ, READ_TO_GPU, Scheduler


class Stuck(AssertionError):
    pass


class Replay:
    def __init__(self, p, pick=lambda inflight: 0, during_compute=lambda n: n):
        self.p, self.pick, self.during_compute = p, pick, during_compute
        self.sched = Scheduler(p)
        self.pinned: dict[int, dict] = {}  # tensor -> {"nbytes", "ready", "users"}
        self.gpu: dict[int, dict] = {}
        self.inflight: list = []  # actions not yet done
        self.current: int | None = None
        self.disk_bytes = 0
        self.reads: list[tuple[int, int]] = []  # (tensor, step) of every read
        self.peak_gpu = self.peak_pinned = 0

    def used(self, tier: dict) -> int:
        return sum(b["nbytes"] for b in tier.values())

    def apply(self, actions) -> None:
        for a in actions:
            if a.kind == READ:
                assert a.tensor not in self.pinned, f"read of {a.tensor} already in pinned memory"
                self.pinned[a.tensor] = {"nbytes": a.nbytes, "ready": False, "users": 0}
                self.inflight.append(a)
                self.disk_bytes += a.nbytes
                self.reads.append((a.tensor, a.step))
            elif a.kind == READ_TO_GPU:
                assert a.tensor not in self.gpu, f"read of {a.tensor} already on the GPU"
                self.gpu[a.tensor] = {"nbytes": a.nbytes, "ready": False, "copy": a}
                self.inflight.append(a)
                self.disk_bytes += a.nbytes
                self.reads.append((a.tensor, a.step))
            elif a.kind == COPY:
                assert a.tensor not in self.gpu, f"copy of {a.tensor} already on the GPU"
                src = self.pinned.get(a.tensor)
                assert src is not None and src["ready"], f"copy of {a.tensor} before its read"
                src["users"] += 1
                self.gpu[a.tensor] = {"nbytes": a.nbytes, "ready": False, "copy": a}
                self.inflight.append(a)
            elif a.kind == FREE_PINNED:
                buf = self.pinned.pop(a.tensor, None)
                assert buf is not None, f"free of {a.tensor}'s pinned buffer, which it lacks"
                assert buf["ready"] and buf["users"] == 0, f"pinned {a.tensor} freed while in use"
            elif a.kind == FREE_GPU:
                buf = self.gpu.pop(a.tensor, None)
                assert buf is not None, f"free of {a.tensor}'s GPU buffer, which it lacks"
                assert buf["ready"], f"GPU buffer of {a.tensor} freed while its copy runs"
                assert a.tensor != self.current, f"GPU buffer of {a.tensor} freed during its step"
            else:
                raise AssertionError(f"unknown action kind {a.kind}")
        self.peak_gpu = max(self.peak_gpu, self.used(self.gpu))
        self.peak_pinned = max(self.peak_pinned, self.used(self.pinned))
        assert self.used(self.gpu) <= self.p.gpu_bytes, "GPU budget exceeded"
        assert self.used(self.pinned) <= self.p.pinned_bytes, "pinned budget exceeded"

    def complete_one(self) -> None:
        if not self.inflight:
            raise Stuck(f"step needing {self.current}: nothing in flight and it is not on the GPU")
        a = self.inflight.pop(self.pick(self.inflight) % len(self.inflight))
        if a.kind == READ:
            self.pinned[a.tensor]["ready"] = True
        elif a.kind == READ_TO_GPU:
            self.gpu[a.tensor]["ready"] = True
        else:
            self.gpu[a.tensor]["ready"] = True
            self.pinned[a.tensor]["users"] -= 1
        self.apply(self.sched.done(a.id))

    def run(self, steps) -> None:
        self.apply(self.sched.start())
        for x in steps:
            self.current = None  # the previous step is over
            self.apply(self.sched.step(x))
            while not (x in self.gpu and self.gpu[x]["ready"]):
                self.complete_one()
            assert self.sched.on_gpu(x)
            self.current = x  # computing: transfers go on finishing meanwhile
            for _ in range(self.during_compute(len(self.inflight))):
                self.complete_one()


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
