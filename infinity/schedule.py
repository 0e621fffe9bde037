"""Python face of the C++ prefetch planner and scheduler (csrc/src/planner.cpp, scheduler.cpp).

    from infinity.schedule import Bandwidths, plan, simulate
    p = plan(sizes, order, gpu_bytes=..., pinned_bytes=..., bandwidths=Bandwidths(...), repeats=4)
    p.resident_gpu, p.resident_pinned        # tensor ids kept resident
    r = simulate(p)                          # r.time_s, r.bound_s, r.disk_read_bytes, ...

The model: every tensor lives on disk and must be on the GPU when accessed; it gets there from
the pinned tier (one host->GPU copy) or from disk (read into pinned memory, then copied). Each
tier's budget is split into a cache and a stream reserve of buffers of the largest tensor: two
(one in use while the next arrives) or one; in pinned memory also none, when tensors that are not
kept there go from disk straight to their GPU buffer (READ_TO_GPU: the aio engine streams it
through its own small bounce buffers). The planner simulates each choice the budgets allow and
keeps the fastest.

- An order that visits each tensor once (layers of a forward pass, repeated) gets static
  residency: a subset kept on the GPU and one kept in pinned memory, each spread evenly over the
  pass so that reads of the others interleave with hits. LRU would get ~0% hits on such a scan.
- Any other trace gets size-aware furthest-next-use eviction with bypass (Belady) in each tier.
- ``Scheduler`` executes a plan online: ``step(tensor)`` when a step begins, ``done(id)`` when a
  read or copy finishes; each returns the actions to issue now, as far ahead as the buffers
  allow (lookahead is bounded by bytes, not counts). When the steps diverge from the plan it
  re-synchronises on the tensor's next planned position, or fetches an unplanned tensor on
  demand (dropping prefetched buffers if it must), and goes on prefetching.
- ``simulate`` runs that same Scheduler against a clock (one disk and one host->GPU link serving
  in issue order at their bandwidths) and reports the time, the bytes and the peaks.

``bound_s`` is the lower bound from an empty start: every distinct tensor is read once, and each
later pass reads at least W - gpu_bytes - pinned_bytes from disk and copies W - gpu_bytes to the
GPU (../shared/BENCHMARKS.md): max(disk, copies, compute).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from infinity._core import _C
from infinity.errors import ConfigError

READ, COPY, FREE_PINNED, FREE_GPU, READ_TO_GPU = 0, 1, 2, 3, 4
TRANSFERS = (READ, COPY, READ_TO_GPU)  # report done(id) for these
FROM_GPU, FROM_PINNED, FROM_DISK = 0, 1, 2


@dataclass(frozen=True)
class Bandwidths:
    """Bytes per second of each link."""

    disk_read: float = 1.6e9
    disk_write: float = 2.3e9
    h2d: float = 55e9
    d2h: float = 40e9

    def __post_init__(self):
        for name in ("disk_read", "disk_write", "h2d", "d2h"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"Bandwidths.{name} must be > 0 bytes/s, got {value!r}")

    def _c(self):
        return _C.Bandwidths(self.disk_read, self.disk_write, self.h2d, self.d2h)


class Plan:
    """A plan from ``plan()``; per-step arrays are indexed by position in the repeated trace."""

    def __init__(self, native, bandwidths: Bandwidths):
        self._native, self.bandwidths = native, bandwidths
        self.resident_gpu = frozenset(native.resident_gpu_list)
        self.resident_pinned = frozenset(native.resident_pinned_list)

    def __getattr__(self, name):  # sizes, order, trace, source, keep_gpu, ... from C++
        return getattr(self._native, name)

    def __repr__(self) -> str:
        return (
            f"Plan({len(self.order)} accesses x {self.repeats}, resident gpu "
            f"{len(self.resident_gpu)} / pinned {len(self.resident_pinned)} tensors, "
            f"{'static residency' if self.cyclic else 'furthest-next-use'})"
        )


@dataclass(frozen=True)
class SimResult:
    time_s: float
    bound_s: float
    disk_read_bytes: int
    h2d_bytes: int
    peak_gpu_bytes: int
    peak_pinned_bytes: int
    disk_busy_s: float
    h2d_busy_s: float
    compute_s: float
    stall_s: float

    @property
    def bound_ratio(self) -> float:
        """bound / time: 1.0 is perfect."""
        return self.bound_s / self.time_s if self.time_s else 1.0


class Action(NamedTuple):
    id: int  # report done(id) for TRANSFERS
    kind: int  # READ (disk -> pinned), COPY (pinned -> GPU), READ_TO_GPU, FREE_PINNED, FREE_GPU
    tensor: int
    step: int  # -1: an unplanned demand
    nbytes: int
    cached: bool  # the buffer is a cache entry (kept across steps)


def plan(
    sizes: Sequence[int],
    order: Sequence[int],
    *,
    gpu_bytes: int,
    pinned_bytes: int,
    bandwidths: Bandwidths | None = None,
    compute_s: float | Sequence[float] | None = None,
    repeats: int = 1,
    gpu_stream_buffers: int | None = None,
    pinned_stream_buffers: int | None = None,
) -> Plan:
    """Plan ``order`` (tensor ids, ``sizes[i]`` bytes each) repeated ``repeats`` times.
    ``compute_s``: seconds per access, one number or one per position of ``order``.
    ``*_stream_buffers``: fix the stream reserve (GPU 1 or 2, pinned 0, 1 or 2 buffers of the
    largest tensor) instead of letting the planner simulate each choice."""
    bandwidths = bandwidths or Bandwidths()
    order = [int(i) for i in order]
    if compute_s is None:
        per_step: list[float] = []
    elif isinstance(compute_s, int | float):
        per_step = [float(compute_s)] * len(order)
    else:
        per_step = [float(c) for c in compute_s]
    if not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be an int >= 1, got {repeats!r}")
    for name, value in (("gpu_bytes", gpu_bytes), ("pinned_bytes", pinned_bytes)):
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be an int >= 0 bytes, got {value!r}")
    if any(not isinstance(s, int) or s < 0 for s in sizes):
        raise ConfigError("sizes must be ints >= 0 (bytes)")
    try:
        native = _C.make_plan(
            list(sizes),
            order,
            repeats,
            gpu_bytes,
            pinned_bytes,
            bandwidths._c(),
            per_step,
            -1 if gpu_stream_buffers is None else gpu_stream_buffers,
            -1 if pinned_stream_buffers is None else pinned_stream_buffers,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return Plan(native, bandwidths)


def simulate(p: Plan) -> SimResult:
    r = _C.simulate(p._native)
    return SimResult(
        r.time_s,
        r.bound_s,
        r.disk_read_bytes,
        r.h2d_bytes,
        r.peak_gpu_bytes,
        r.peak_pinned_bytes,
        r.disk_busy_s,
        r.h2d_busy_s,
        r.compute_s,
        r.stall_s,
    )


class Scheduler:
    """Online execution of a plan; see the module docstring. Actions are ``Action`` tuples."""

    def __init__(self, p: Plan):
        self._s = _C.Scheduler(p._native)

    def start(self) -> list[Action]:
        return [Action(*a) for a in self._s.start()]

    def step(self, tensor: int) -> list[Action]:
        return [Action(*a) for a in self._s.step(tensor)]

    def done(self, action_id: int) -> list[Action]:
        return [Action(*a) for a in self._s.done(action_id)]

    def on_gpu(self, tensor: int) -> bool:
        return self._s.on_gpu(tensor)

    @property
    def position(self) -> int:
        return self._s.position

    def stats(self) -> dict[str, int]:
        return self._s.stats()
