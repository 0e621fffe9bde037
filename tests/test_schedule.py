"""The C++ planner and scheduler against the references in schedule_reference.py."""

import random

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings
from schedule_reference import Replay, optimal_disk_bytes

from infinity import CapacityError, ConfigError
from infinity.schedule import (
    COPY_BACK,
    FROM_DISK,
    FROM_GPU,
    FROM_PINNED,
    READ,
    TRANSFERS,
    WRITE,
    Bandwidths,
    Scheduler,
    plan,
    simulate,
)

L = 1 << 30
BW = Bandwidths(disk_read=1.6e9, disk_write=2.3e9, h2d=55e9, d2h=40e9)


def test_issue_example_80_layers_4_scans():
    """Pinned budget of half the layers, GPU of three: after the first scan about half of each
    scan comes from disk, and the total is within 10% of the bound."""
    p = plan([L] * 80, range(80), gpu_bytes=3 * L, pinned_bytes=40 * L, bandwidths=BW, repeats=4)
    r = simulate(p)
    later = (r.disk_read_bytes - 80 * L) / 3  # first scan reads everything
    assert 0.45 * 80 * L <= later <= 0.55 * 80 * L
    assert r.time_s <= 1.10 * r.bound_s
    assert r.bound_s <= r.time_s
    assert r.peak_gpu_bytes <= 3 * L and r.peak_pinned_bytes <= 40 * L
    assert len(p.resident_gpu) + len(p.resident_pinned) >= 40 - 4  # minus the stream buffers
    # spread over the pass, not a block at the front
    assert max(p.resident_pinned) - min(p.resident_pinned) > 60


def test_lru_would_miss_everything_this_keeps_a_subset():
    p = plan([L] * 10, range(10), gpu_bytes=2 * L, pinned_bytes=6 * L, repeats=3)
    later = list(p.source[10:])
    gpu, pinned = len(p.resident_gpu), len(p.resident_pinned)
    assert gpu + pinned >= 4  # 8 layers of budget, at most one stream buffer of 2 per tier
    assert later.count(FROM_GPU) == 2 * gpu and later.count(FROM_PINNED) == 2 * pinned
    assert later.count(FROM_DISK) == 2 * (10 - gpu - pinned)
    assert set(p.source[:10]) == {FROM_DISK}


def test_everything_fits_then_one_read_per_tensor():
    p = plan([L, 2 * L, L], [0, 1, 2], gpu_bytes=20 * L, pinned_bytes=4 * L, repeats=5)
    r = simulate(p)
    assert r.disk_read_bytes == 4 * L and r.h2d_bytes <= 4 * L  # 0 when read straight to GPU
    assert set(p.source[3:]) == {FROM_GPU}


def test_compute_bound_trace_reaches_compute_time():
    p = plan([L] * 8, range(8), gpu_bytes=2 * L, pinned_bytes=8 * L, compute_s=2.0, repeats=3)
    r = simulate(p)
    assert r.bound_s == pytest.approx(48.0)
    assert r.time_s <= 1.05 * r.bound_s + L / BW.disk_read + L / BW.h2d  # plus the pipeline fill


def test_bad_input_is_a_clear_error():
    with pytest.raises(CapacityError, match=r"does not fit the GPU budget .* raise it to at least"):
        plan([L], [0], gpu_bytes=L - 1, pinned_bytes=2 * L)
    tiny = plan([L], [0], gpu_bytes=L, pinned_bytes=10, repeats=2)  # no room to stage: direct
    assert tiny.pinned_stream_bytes == 0  # one GPU buffer, nothing cached: read each pass
    assert simulate(tiny).disk_read_bytes == 2 * L and simulate(tiny).peak_pinned_bytes == 0
    with pytest.raises(ConfigError, match=r"order\[1\] = 5 is not a tensor id"):
        plan([L], [0, 5], gpu_bytes=L, pinned_bytes=L)
    with pytest.raises(ConfigError, match="compute_s has 1 entries"):
        plan([L], [0, 0], gpu_bytes=L, pinned_bytes=L, compute_s=[1.0])
    with pytest.raises(ConfigError, match="disk_read"):
        Bandwidths(disk_read=0)
    with pytest.raises(ConfigError, match="repeats"):
        plan([L], [0], gpu_bytes=L, pinned_bytes=L, repeats=0)


@st.composite
def traces(draw, max_tensors=8, max_len=24):
    n = draw(st.integers(1, max_tensors))
    sizes = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    order = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=max_len))
    largest = max(sizes[i] for i in order)
    gpu = draw(st.integers(largest, 3 * largest + 4))
    pinned = draw(st.integers(largest, 3 * largest + 6))
    repeats = draw(st.integers(1, 3))
    return sizes, order, gpu, pinned, repeats


@settings(max_examples=300, deadline=None)
@given(traces(), st.randoms(use_true_random=False))
def test_random_traces_replay_cleanly_in_any_completion_order(case, rnd):
    """Capacities hold, every access finds its tensor on the GPU, nothing is read or copied
    into a tier that holds it, whatever order the transfers finish in."""
    sizes, order, gpu, pinned, repeats = case
    p = plan(sizes, order, gpu_bytes=gpu, pinned_bytes=pinned, repeats=repeats)
    replay = Replay(
        p,
        pick=lambda inflight: rnd.randrange(len(inflight)),
        during_compute=lambda n: rnd.randint(0, n),
    )
    replay.run(p.trace)
    assert replay.peak_gpu <= gpu and replay.peak_pinned <= pinned


@settings(max_examples=200, deadline=None)
@given(traces(), st.lists(st.integers(0, 7), min_size=1, max_size=30), st.randoms())
def test_divergent_steps_never_stall(case, steps, rnd):
    """Steps that follow no plan (other tensors, other order, unknown ones) are still served."""
    sizes, order, gpu, pinned, repeats = case
    p = plan(sizes, order, gpu_bytes=gpu, pinned_bytes=pinned, repeats=repeats)
    staging = p.pinned_stream_bytes or p.gpu_stream_bytes  # 0: read straight to the GPU
    fits = [i for i, n in enumerate(sizes) if n <= min(p.gpu_stream_bytes, staging)]
    other = [fits[s % len(fits)] for s in steps]
    mixed = other + list(p.trace) + other
    replay = Replay(
        p,
        pick=lambda inflight: rnd.randrange(len(inflight)),
        during_compute=lambda n: rnd.randint(0, n),
    )
    replay.run(mixed)


def test_unplanned_tensor_too_large_for_the_stream_buffers():
    p = plan([L, 8 * L], [0], gpu_bytes=2 * L, pinned_bytes=2 * L)
    replay = Replay(p)
    with pytest.raises(CapacityError, match=r"tensor 1 .* exceeds the stream buffers"):
        replay.run([0, 1])


def test_jump_onto_a_planned_eviction_frees_the_copy_at_once():
    """Found by hypothesis: steps jump past the trace's end onto a step whose GPU admission waits
    for a planned eviction whose last reader was skipped; nothing is in flight, so the scheduler
    itself must give the copy back (it used to wait for an event that never came)."""
    p = plan([1, 1, 1, 4], [0, 3, 0, 1, 1, 3], gpu_bytes=9, pinned_bytes=4, repeats=1)
    assert p.evict_gpu, "the case needs a planned GPU eviction"
    for seed in range(200):
        rnd = random.Random(seed)
        replay = Replay(
            p,
            pick=lambda inflight, rnd=rnd: rnd.randrange(len(inflight)),
            during_compute=lambda n, rnd=rnd: rnd.randint(0, n),
        )
        replay.run([0, 0, 3, 0, 1, 1, 3, 0])


def test_divergence_resynchronises_instead_of_giving_up():
    p = plan([L] * 10, range(10), gpu_bytes=3 * L, pinned_bytes=4 * L, repeats=1)
    replay = Replay(p)
    replay.run([0, 1, 2, 6, 7, 8, 9])  # skipped 3..5: carries on from 6 with prefetch
    stats = replay.sched.stats()
    assert stats["divergences"] == 1 and stats["demand_fetches"] == 0
    assert replay.sched.position == 9
    planned = [t for t, step in replay.reads if 0 <= step < 10]
    assert sorted(planned) == sorted(set(planned))  # nothing read twice on the way
    assert {6, 7, 8, 9} <= set(planned)
    assert (0, 10) in replay.reads and (1, 11) in replay.reads  # the next pass, ahead


@settings(max_examples=150, deadline=None)
@given(traces(max_tensors=4, max_len=7))
def test_disk_bytes_within_factor_of_the_optimum(case):
    """Stated factor: the simulated disk bytes are at most 1.5x the exhaustive optimum for the
    same cache capacities, plus one read of the largest tensor (2x when every transfer finishes
    in issue order with nothing overlapping compute)."""
    sizes, order, gpu, pinned, repeats = case
    p = plan(sizes, order, gpu_bytes=gpu, pinned_bytes=pinned, repeats=min(repeats, 2))
    if len(p.trace) > 12:
        return
    best = optimal_disk_bytes(sizes, list(p.trace), p.gpu_cache_bytes, p.pinned_cache_bytes)
    r = simulate(p)
    assert r.disk_read_bytes <= 1.5 * best + max(sizes)
    replay = Replay(p, during_compute=lambda n: 0)
    replay.run(p.trace)
    in_trace = sum(sizes[t] for t, step in replay.reads if step < len(p.trace))
    assert in_trace <= 2 * best + max(sizes)  # transfers finishing in the worst order


def test_runtime_reads_stay_close_to_the_plan_on_a_large_random_trace():
    """The scheduler decides from the actual state (a cache entry waits for its last reader
    before its room is reused; meanwhile a fetch may go to a stream buffer and be read again),
    so it can read more than the plan: by at most 25% under the simulated clock here, and 60%
    when transfers finish in the worst order (all in flight, FIFO)."""
    rnd = random.Random(7)
    sizes = [rnd.randint(1, 8) << 20 for _ in range(50)]
    order = [rnd.randrange(50) for _ in range(400)]
    p = plan(sizes, order, gpu_bytes=40 << 20, pinned_bytes=120 << 20, repeats=2)
    planned = sum(sizes[x] for x, src in zip(p.trace, p.source, strict=True) if src == FROM_DISK)
    r = simulate(p)
    assert planned <= r.disk_read_bytes <= 1.25 * planned
    replay = Replay(p)
    replay.run(p.trace)
    read = sum(sizes[t] for t, step in replay.reads if step < len(p.trace))
    assert planned <= read <= 1.6 * planned
    assert r.peak_pinned_bytes <= 120 << 20 and r.peak_gpu_bytes <= 40 << 20


def test_scheduler_rejects_unknown_ids_with_the_numbers():
    from infinity.schedule import Scheduler

    sched = Scheduler(plan([L] * 3, range(3), gpu_bytes=2 * L, pinned_bytes=2 * L))
    sched.start()
    with pytest.raises(ValueError, match=r"step\(7\): not a tensor id \(there are 3\)"):
        sched.step(7)
    with pytest.raises(ValueError, match=r"done\(99\): no such transfer in flight"):
        sched.done(99)


def test_stream_buffers_borrow_the_empty_cache_in_the_first_pass():
    """One stream buffer per tier and one cached layer each: before the caches fill, the disk
    reads ahead into the cache space (a compute stall in the first pass does not stop it), the
    budgets hold, and the cached layers still end up resident."""
    p = plan([L] * 8, list(range(8)), gpu_bytes=2 * L, pinned_bytes=2 * L, repeats=2,
             gpu_stream_buffers=1, pinned_stream_buffers=1)  # fmt: skip
    assert p.pinned_stream_bytes == L and p.resident_pinned and p.resident_gpu
    first = [a for a in Scheduler(p).start() if a.kind == READ]
    assert [a.tensor for a in first] == [0, 1]  # two reads with one stream buffer
    replay = Replay(p, during_compute=lambda n: 0)
    replay.run(list(range(8)) * 3)
    assert replay.peak_pinned <= 2 * L and replay.peak_gpu <= 2 * L
    later = [t for t, step in replay.reads if 16 <= step < 24]  # the third pass: steady state
    assert sorted(later) == sorted(set(range(8)) - p.resident_pinned - p.resident_gpu)


# -- write-back ----------------------------------------------------------------------------------


def _replay(p, rnd):
    return Replay(
        p,
        pick=lambda inflight: rnd.randrange(len(inflight)),
        during_compute=lambda n: rnd.randint(0, n),
    )


@settings(max_examples=400, deadline=None)
@given(
    traces(),
    st.lists(st.booleans(), min_size=24, max_size=24),
    st.booleans(),
    st.sets(st.integers(0, 71), max_size=3),
    st.randoms(use_true_random=False),
)
def test_writes_replay_cleanly_in_any_completion_order(case, flags, tell, flush_at, rnd):
    """With writes in flight, whatever order transfers finish in: no deadlock, budgets hold,
    every step computes on its tensor's newest version, nothing is read from disk while its
    newest version is dirty or being written, and after the final flush the disk holds every
    tensor's last written version (Replay checks each action; flushes mid-run too)."""
    sizes, order, gpu, pinned, repeats = case
    writes = flags[: len(order)]
    p = plan(sizes, order, gpu_bytes=gpu, pinned_bytes=pinned, repeats=repeats, writes=writes)
    replay = _replay(p, rnd)
    per_step = [writes[t % len(order)] for t in range(len(p.trace))]
    replay.run(p.trace, per_step, tell=tell, flush_at=flush_at)
    replay.flush()
    assert replay.peak_gpu <= gpu and replay.peak_pinned <= pinned
    assert replay.latest or not any(writes)


@settings(max_examples=300, deadline=None)
@given(
    traces(),
    st.lists(st.tuples(st.integers(0, 7), st.booleans()), min_size=1, max_size=30),
    st.lists(st.booleans(), min_size=24, max_size=24),
    st.randoms(use_true_random=False),
)
def test_divergent_steps_with_writes_never_stall(case, steps, flags, rnd):
    """Steps off the plan (unknown tensors, other order), each writing or not whatever the plan
    says (step(x, writes=...)), are served on the newest data, and the flush completes."""
    sizes, order, gpu, pinned, repeats = case
    p = plan(sizes, order, gpu_bytes=gpu, pinned_bytes=pinned, repeats=repeats,
             writes=flags[: len(order)])  # fmt: skip
    staging = p.pinned_stream_bytes or p.gpu_stream_bytes
    fits = [i for i, n in enumerate(sizes) if n <= min(p.gpu_stream_bytes, staging)]
    other = [(fits[s % len(fits)], w and sizes[fits[s % len(fits)]] <= pinned) for s, w in steps]
    mixed = other + [(x, rnd.random() < 0.5) for x in p.trace] + other
    replay = _replay(p, rnd)
    replay.run([x for x, _ in mixed], [w for _, w in mixed])
    replay.flush()


def _hold_writes(inflight):
    """Complete anything but a WRITE while there is one: writes stay in flight for long."""
    others = [i for i, (a, _) in enumerate(inflight) if a.kind != WRITE]
    return others[0] if others else 0


def test_read_after_write_comes_from_the_dirty_copy_not_the_disk():
    """Tensor 0 is written at step 0 and read again at step 3 after its GPU and pinned room went
    to others; its write to disk is still in flight: step 3 copies it from the write buffer."""
    p = plan([1] * 3, [0, 1, 2, 0], gpu_bytes=1, pinned_bytes=2, writes={0})
    assert p.pinned_write_bytes == 1 and p.gpu_stream_bytes == 1
    replay = Replay(p, pick=_hold_writes, during_compute=lambda n: 0)
    replay.run(p.trace, [True, False, False, False], tell=False)
    assert [t for t, _ in replay.reads].count(0) == 1  # never read back from disk
    assert replay.sched.stats()["copy_backs"] == 1
    replay.flush()
    assert replay.disk[0] == replay.latest[0] == 1


def test_pinned_write_back_cache_writes_only_at_flush():
    """Every tensor fits the pinned cache: passes of writes never touch the disk; flush writes
    each dirty tensor once (and copies back the GPU-resident ones first)."""
    p = plan([L] * 6, range(6), gpu_bytes=3 * L, pinned_bytes=9 * L, repeats=3,
             writes=[True] * 6)  # fmt: skip
    assert len(p.resident_gpu) + len(p.resident_pinned) == 6
    replay = Replay(p)
    replay.run(p.trace, [True] * len(p.trace), tell=False)
    kinds = [a.kind for a, _ in replay.inflight]
    assert replay.write_bytes == 0 and WRITE not in kinds
    sched = replay.sched
    back = sched.stats()["copy_backs"]
    assert back == 6 * 3 - 3 * len(p.resident_gpu)  # GPU-resident ones wait for the flush
    replay.flush()
    assert replay.write_bytes == 6 * L and sched.stats()["writes"] == 6
    assert sched.stats()["copy_backs"] == back + len(p.resident_gpu)
    assert sched.flushed() and sched.flush() == [] and sched.flushed()


def test_write_through_for_tensors_not_kept():
    """Nothing fits a cache: every dirtied tensor is copied back and written during the pass,
    its write buffer freed once written; reads of the next pass wait for nothing stale."""
    p = plan([L] * 4, range(4), gpu_bytes=L, pinned_bytes=2 * L, repeats=2, writes={1, 3},
             pinned_stream_buffers=1)  # fmt: skip
    assert p.pinned_cache_bytes == 0 and p.gpu_cache_bytes == 0
    r = simulate(p)
    assert r.disk_write_bytes == 2 * 2 * L and r.d2h_bytes == 2 * 2 * L
    assert r.disk_read_bytes == 8 * L and r.peak_pinned_bytes <= 2 * L
    replay = Replay(p, during_compute=lambda n: 0)
    replay.run(p.trace, [t % 4 in (1, 3) for t in range(8)], tell=False)
    assert replay.write_bytes >= 2 * L  # the first pass's, before the flush
    replay.flush()
    assert replay.write_bytes == 4 * L


def test_scheduler_api_for_write_back():
    p = plan([L] * 2, [0, 1], gpu_bytes=2 * L, pinned_bytes=2 * L, writes=[True, False])
    sched = Scheduler(p)
    assert set(TRANSFERS) >= {COPY_BACK, WRITE} and (COPY_BACK, WRITE) == (5, 6)
    inflight = [a for a in sched.start() if a.kind in TRANSFERS]
    while not sched.on_gpu(0):
        inflight += [a for a in sched.done(inflight.pop(0).id) if a.kind in TRANSFERS]
    sched.step(0)
    actions = sched.finish()  # step 0 wrote tensor 0: copied back as soon as it ends
    assert [a.kind for a in actions if a.tensor == 0] == [COPY_BACK]
    back = next(a for a in actions if a.kind == COPY_BACK)
    assert back.step == 0 and back.nbytes == L
    assert not sched.flushed() or sched.stats()["copy_backs"] == 1
    out = sched.flush()
    assert not sched.flushed()  # the copy-back, then the write, are still to come
    pending = inflight + [a for a in actions + out if a.kind in TRANSFERS]
    while pending:
        pending += [a for a in sched.done(pending.pop(0).id) if a.kind in TRANSFERS]
    assert sched.flushed() and sched.stats()["writes"] == 1


def test_write_input_is_checked():
    with pytest.raises(ConfigError, match=r"writes must be one bool per position"):
        plan([L], [0, 0], gpu_bytes=L, pinned_bytes=L, writes=[True])
    with pytest.raises(ConfigError, match=r"positions \[2\] are not positions of order"):
        plan([L], [0, 0], gpu_bytes=L, pinned_bytes=L, writes={2})
    with pytest.raises(CapacityError, match=r"dirtied tensor of .* pinned budget"):
        plan([L, 4 * L], [0, 1], gpu_bytes=4 * L, pinned_bytes=2 * L, writes={1})
    both = plan([L] * 2, [0, 1], gpu_bytes=L, pinned_bytes=2 * L, writes={1})
    assert list(both.writes) == [0, 1] and both.pinned_write_bytes == L
    ro = plan([L] * 2, [0, 1], gpu_bytes=L, pinned_bytes=2 * L)
    assert ro.pinned_write_bytes == 0 and simulate(ro).disk_write_bytes == 0


def test_residency_prefers_dirty_tensors():
    """Half the tensors are dirtied; the pinned cache holds a quarter: all of it dirty ones
    (each saves a read and a write per pass, a clean one only a read), spread over the pass."""
    n = 40
    p = plan([L] * n, range(n), gpu_bytes=2 * L, pinned_bytes=12 * L, bandwidths=BW, repeats=3,
             writes={i for i in range(n) if i % 2}, gpu_stream_buffers=2)  # fmt: skip
    kept = p.resident_pinned | p.resident_gpu
    assert kept and all(i % 2 for i in kept)
    assert max(p.resident_pinned) - min(p.resident_pinned) > n / 2


def test_bound_with_writes_by_hand():
    """W = 10 units, D = 6 dirtied, G = 2, P = 3 (M = 5), 3 passes:
    reads 10 + 2 * 5, writes 6 + 2 * 1, h2d 10 + 2 * 8, d2h 6 + 2 * 4."""
    bw = Bandwidths(disk_read=1.0, disk_write=2.0, h2d=4.0, d2h=1.0)
    p = plan([1] * 10, range(10), gpu_bytes=2, pinned_bytes=3, bandwidths=bw, repeats=3,
             writes=set(range(6)))  # fmt: skip
    disk = (10 + 2 * 5) / 1.0 + (6 + 2 * 1) / 2.0
    assert simulate(p).bound_s == pytest.approx(max(disk, (10 + 2 * 8) / 4.0, 6 + 2 * 4))
    slow_d2h = Bandwidths(disk_read=100.0, disk_write=100.0, h2d=100.0, d2h=0.5)
    q = plan([1] * 10, range(10), gpu_bytes=2, pinned_bytes=3, bandwidths=slow_d2h, repeats=3,
             writes=set(range(6)))  # fmt: skip
    r = simulate(q)
    assert r.bound_s == pytest.approx((6 + 2 * 4) / 0.5) and r.bound_s <= r.time_s


def _sweep(bandwidths, repeats=4):
    """An optimizer sweep: 80 equal units, each read and written once per pass; pinned budget
    half the units, GPU three."""
    return plan([L] * 80, range(80), gpu_bytes=3 * L, pinned_bytes=40 * L,
                bandwidths=bandwidths, repeats=repeats, writes=[True] * 80)  # fmt: skip


def test_optimizer_sweep_within_10pct_of_the_bound():
    p = _sweep(BW)
    r = simulate(p)
    assert r.bound_s <= r.time_s <= 1.10 * r.bound_s
    kept = len(p.resident_gpu) + len(p.resident_pinned)
    assert kept >= 40  # the write-back caches hold (almost) every byte of the budgets
    assert r.disk_read_bytes == (80 + 3 * (80 - kept)) * L
    assert r.disk_write_bytes == r.disk_read_bytes  # each unit once, the kept ones at the flush
    assert r.d2h_bytes == (4 * 80 - 3 * len(p.resident_gpu)) * L
    assert r.peak_pinned_bytes <= 40 * L and r.peak_gpu_bytes <= 3 * L


NVME = [
    Bandwidths(disk_read=25e9, disk_write=25e9, h2d=55e9, d2h=55e9),
    Bandwidths(disk_read=50e9, disk_write=50e9, h2d=55e9, d2h=55e9),
]


@pytest.mark.parametrize("bandwidths", NVME, ids=["nvme-25GBps", "nvme-50GBps"])
@pytest.mark.parametrize("pinned_layers", [0, 20, 40])
def test_inference_scan_on_nvme_arrays_within_10pct_of_the_bound(bandwidths, pinned_layers):
    """80 layers, GPU budget three, pinned budget 0, 1/4, 1/2 of the weights, 4 passes: when the
    disk is almost as fast as PCIe, direct reads share the link and the bound is h2d's."""
    p = plan([L] * 80, range(80), gpu_bytes=3 * L, pinned_bytes=pinned_layers * L,
             bandwidths=bandwidths, repeats=4)  # fmt: skip
    r = simulate(p)
    assert r.bound_s <= r.time_s <= 1.10 * r.bound_s
    assert r.disk_write_bytes == 0 and r.d2h_bytes == 0


@pytest.mark.parametrize("bandwidths", NVME, ids=["nvme-25GBps", "nvme-50GBps"])
def test_optimizer_sweep_on_nvme_arrays_within_10pct_of_the_bound(bandwidths):
    r = simulate(_sweep(bandwidths))
    assert r.bound_s <= r.time_s <= 1.10 * r.bound_s


def test_simulate_counts_the_final_flush():
    """All four units stay pinned and dirty: their writes happen only in the final flush, and
    the time includes them."""
    bw = Bandwidths(disk_read=1e9, disk_write=1e9, h2d=1e12, d2h=1e12)
    p = plan([L] * 4, range(4), gpu_bytes=L, pinned_bytes=6 * L, bandwidths=bw, repeats=2,
             writes=[True] * 4)  # fmt: skip
    r = simulate(p)
    assert r.disk_read_bytes == 4 * L and r.disk_write_bytes == 4 * L
    assert r.time_s >= (4 * L + 4 * L) / 1e9  # the flush's writes follow the first pass's reads
