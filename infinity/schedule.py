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
  transfer finishes (any kind in TRANSFERS); each returns the actions to issue now, as far
  ahead as the buffers allow (lookahead is bounded by bytes, not counts). When the steps diverge
  from the plan it re-synchronises on the tensor's next planned position, or fetches an
  unplanned tensor on demand (dropping prefetched buffers if it must), and goes on prefetching.
- Write-back: ``plan(..., writes=...)`` marks the accesses that dirty their tensor. When such a
  step ends (the next ``step()``, or ``finish()``), the GPU copy goes back to pinned memory
  (COPY_BACK: into the tensor's pinned buffer, a new one if it has none) and from there to disk
  (WRITE), both reported with ``done(id)``. A dirty copy the plan keeps (a pinned or GPU cache
  entry) stays dirty there until evicted or ``flush()``ed: what fits in the budgets does not
  touch the disk between passes. Reads never see stale data: a tensor whose newest contents
  are dirty or being written is served from that copy, never read from disk. A pinned write
  reserve (the largest dirtied tensor) that reads leave free, and write-back going before
  prefetch, keep writes, and so GPU room, draining. ``flush()`` ends the current step and
  writes everything dirty; ``flushed()`` says when it is all on disk.
- ``simulate`` runs that same Scheduler against a clock (one disk serving reads and writes in
  issue order, one host->GPU and one GPU->host link, compute per step; a direct read streams
  through the host->GPU link while the disk reads it), ends with a flush, and reports the time,
  the bytes and the peaks.

``bound_s`` is the lower bound from an empty start (extended to
writes). W: bytes of the distinct tensors of a pass, D: of those it dirties, G, P: the GPU and
pinned budgets, R passes, M = G + P::

    reads  >= W + (R-1) max(0, W - M)      h2d >= W + (R-1) max(0, W - G)
    writes >= D + (R-1) max(0, D - M)      d2h >= D + (R-1) max(0, D - G)
    time   >= max(reads/disk_read + writes/disk_write, h2d/h2d, d2h/d2h, compute)

Across each pass boundary a tensor either stays in memory (at most M bytes of them; on the GPU
at most G) or is read (copied) again, and if dirtied, also written (copied back) in between;
keeping the dirty ones saves the most. The final flush writes and copies back all of D. The
disk is one device, so its read and write times add.
"""

from __future__ import annotations

from collections.abc import Sequence, Set
from dataclasses import dataclass
from typing import NamedTuple

from infinity._core import _C
from infinity.errors import ConfigError

READ, COPY, FREE_PINNED, FREE_GPU, READ_TO_GPU, COPY_BACK, WRITE = 0, 1, 2, 3, 4, 5, 6
TRANSFERS = (READ, COPY, READ_TO_GPU, COPY_BACK, WRITE)  # report done(id) for these
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
    disk_write_bytes: int = 0
    d2h_bytes: int = 0
    d2h_busy_s: float = 0.0
    transfers: int = 0  # transfer actions issued (each one done() event)

    @property
    def bound_ratio(self) -> float:
        """bound / time: 1.0 is perfect."""
        return self.bound_s / self.time_s if self.time_s else 1.0


class Action(NamedTuple):
    id: int  # report done(id) for TRANSFERS
    kind: int  # READ (disk -> pinned), COPY (pinned -> GPU), READ_TO_GPU, FREE_PINNED, FREE_GPU,
    #            COPY_BACK (GPU -> pinned), WRITE (pinned -> disk)
    tensor: int
    step: int  # the step served, or (COPY_BACK, WRITE) that dirtied the data; -1: unplanned
    nbytes: int
    cached: bool  # the (pinned, for COPY_BACK and WRITE) buffer is a cache entry


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
    writes: Sequence[bool] | Set[int] | None = None,
) -> Plan:
    """Plan ``order`` (tensor ids, ``sizes[i]`` bytes each) repeated ``repeats`` times.
    ``compute_s``: seconds per access, one number or one per position of ``order``.
    ``*_stream_buffers``: fix the stream reserve (GPU 1 or 2, pinned 0, 1 or 2 buffers of the
    largest tensor) instead of letting the planner simulate each choice.
    ``writes``: the accesses that dirty their tensor (its GPU copy holds new contents after that
    step, which must reach pinned memory and the disk), one bool per position of ``order`` or a
    set of positions; pinned memory then also keeps a write reserve of the largest such tensor."""
    bandwidths = bandwidths or Bandwidths()
    order = [int(i) for i in order]
    flags = _write_flags(writes, len(order))
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
            flags,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return Plan(native, bandwidths)


def _write_flags(writes, positions: int) -> list[int]:
    if writes is None:
        return []
    if isinstance(writes, Set):
        bad = sorted(i for i in writes if not isinstance(i, int) or not 0 <= i < positions)
        if bad:
            raise ConfigError(
                f"writes: positions {bad[:5]} are not positions of order (0..{positions - 1})"
            )
        return [int(i in writes) for i in range(positions)]
    flags = list(writes)
    if len(flags) != positions or any(f not in (0, 1) for f in flags):
        raise ConfigError(
            f"writes must be one bool per position of order ({positions}) or a set of "
            f"positions, got {len(flags)} entries"
        )
    return [int(f) for f in flags]


def simulate(p: Plan) -> SimResult:
    """Run the Scheduler on the plan against a simulated clock, then flush (counted)."""
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
        r.disk_write_bytes,
        r.d2h_bytes,
        r.d2h_busy_s,
        r.transfers,
    )


class Scheduler:
    """Online execution of a plan; see the module docstring. Actions are ``Action`` tuples."""

    def __init__(self, p: Plan, *, past_end: bool = True):
        self._s = _C.Scheduler(p._native, past_end)

    def start(self) -> list[Action]:
        return [Action(*a) for a in self._s.start()]

    def step(self, tensor: int, writes: bool | None = None) -> list[Action]:
        """A step needing ``tensor`` begins and the previous one ends. ``writes``: the step
        dirties its tensor (None: as planned at the matched position; unplanned: no)."""
        flag = -1 if writes is None else int(bool(writes))
        return [Action(*a) for a in self._s.step(tensor, flag)]

    def finish(self) -> list[Action]:
        """The current step ends and no other begins (the end of a pass)."""
        return [Action(*a) for a in self._s.finish()]

    def flush(self) -> list[Action]:
        """finish(), then write every dirty copy back to disk; ``flushed()`` says when done."""
        return [Action(*a) for a in self._s.flush()]

    def flushed(self) -> bool:
        return self._s.flushed()

    def done(self, action_id: int) -> list[Action]:
        return [Action(*a) for a in self._s.done(action_id)]

    def on_gpu(self, tensor: int) -> bool:
        """Its GPU copy is there for the current step (a step that writes its tensor also waits
        for a copy-back still reading it)."""
        return self._s.on_gpu(tensor)

    @property
    def position(self) -> int:
        return self._s.position

    def stats(self) -> dict[str, int]:
        return self._s.stats()
