"""The C++ Arena against a reference model of its free space (maximal gaps between live blocks)."""

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from infinity import CapacityError
from infinity._core import Arena

ALIGN = 256
CAPACITY = 64 * ALIGN


def gaps(live: dict[int, int], capacity: int) -> list[int]:
    """Sizes of the free gaps between live blocks: what a fully coalescing arena must hold."""
    out, cursor = [], 0
    for offset in sorted(live):
        if offset > cursor:
            out.append(offset - cursor)
        cursor = offset + live[offset]
    if capacity > cursor:
        out.append(capacity - cursor)
    return out


class ArenaMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.arena = Arena(CAPACITY, ALIGN)
        self.live: dict[int, int] = {}  # offset -> reserved bytes

    @rule(nbytes=st.integers(0, CAPACITY + ALIGN))
    def alloc(self, nbytes):
        want = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        fits = max(gaps(self.live, CAPACITY), default=0) >= want
        try:
            offset = self.arena.alloc(nbytes)
        except CapacityError as exc:
            assert not fits, f"best fit refused {want} bytes with a gap that fits: {exc}"
            assert str(nbytes) in str(exc) or "MiB" in str(exc) or "KiB" in str(exc)
            return
        assert fits
        assert offset % ALIGN == 0
        assert offset + want <= CAPACITY
        for other, size in self.live.items():
            assert offset + want <= other or other + size <= offset, "overlapping blocks"
        assert self.arena.size_of(offset) == want
        self.live[offset] = want

    @rule(slot=st.integers(0, CAPACITY // ALIGN - 1), units=st.integers(1, 8))
    def reserve(self, slot, units):
        offset, want = slot * ALIGN, units * ALIGN
        free = offset + want <= CAPACITY and all(
            offset + want <= other or other + size <= offset for other, size in self.live.items()
        )
        if not free:
            with pytest.raises(ValueError, match="not free"):
                self.arena.reserve(offset, want)
            return
        self.arena.reserve(offset, want)
        self.live[offset] = want

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        offset = data.draw(st.sampled_from(sorted(self.live)))
        self.arena.free(offset)
        del self.live[offset]

    @rule(offset=st.integers(0, CAPACITY))
    def free_foreign(self, offset):
        if offset in self.live:
            return
        with pytest.raises(ValueError, match="not a live allocation"):
            self.arena.free(offset)

    @invariant()
    def stats_match_reference(self):
        s = self.arena.stats()
        expected_gaps = gaps(self.live, CAPACITY)
        assert s.used_bytes == sum(self.live.values())
        assert s.free_bytes == CAPACITY - s.used_bytes
        assert s.allocation_count == len(self.live)
        assert s.free_block_count == len(expected_gaps), "neighbouring free blocks not coalesced"
        assert s.largest_free_bytes == max(expected_gaps, default=0)

    def teardown(self):
        for offset in list(self.live):
            self.arena.free(offset)
        s = self.arena.stats()
        assert (s.free_block_count, s.largest_free_bytes, s.used_bytes) == (1, CAPACITY, 0)


TestArenaMachine = ArenaMachine.TestCase
TestArenaMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


def test_capacity_error_carries_numbers():
    arena = Arena(4 * 4096, 4096)
    arena.alloc(3 * 4096)
    with pytest.raises(CapacityError) as info:
        arena.alloc(2 * 4096)
    message = str(info.value)
    assert "8.00 KiB" in message and "4.00 KiB free of 16.00 KiB" in message


def test_bad_construction():
    with pytest.raises(ValueError, match="power of two"):
        Arena(4096, 3000)
    with pytest.raises(ValueError, match="multiple of the alignment"):
        Arena(5000, 4096)


def test_reserve_rejects_unaligned():
    arena = Arena(16 * 4096, 4096)
    with pytest.raises(ValueError, match="not a multiple"):
        arena.reserve(100, 4096)


def test_zero_capacity_refuses_everything():
    arena = Arena(0, 4096)
    with pytest.raises(CapacityError):
        arena.alloc(1)
    assert arena.stats().free_block_count == 0
