"""NVMe space: aligned extents in one data file per path, striped over paths, reused when freed.

Each data file's space is a C++ Arena of 4 KiB-aligned offsets (capacity 2**50: the file grows as
its tail is used; disk-full is reported by the I/O engine when blocks are reserved). A tensor of at
least ``count * stripe_min_bytes`` is cut into one contiguous piece per path so that every drive
reads in parallel; a smaller one goes whole to the path with the most free room.
"""

from __future__ import annotations

from infinity._core import Arena
from infinity.config import ALIGNMENT_BYTES
from infinity.store.manifest import Extent

VIRTUAL_FILE_BYTES = 1 << 50


class SpaceMap:
    def __init__(self, count: int, stripe_min_bytes: int):
        self.arenas = [Arena(VIRTUAL_FILE_BYTES, ALIGNMENT_BYTES) for _ in range(count)]
        self.stripe_min_bytes = stripe_min_bytes

    def plan_pieces(self, nbytes: int) -> list[tuple[int, int]]:
        """(file, nbytes) pieces of a tensor of ``nbytes``."""
        count = len(self.arenas)
        if count == 1 or nbytes < count * self.stripe_min_bytes:
            used = [a.stats().used_bytes for a in self.arenas]
            return [(used.index(min(used)), nbytes)]
        piece = -(-nbytes // count // ALIGNMENT_BYTES) * ALIGNMENT_BYTES
        pieces, left = [], nbytes
        for file in range(count):
            take = min(piece, left)
            if take:
                pieces.append((file, take))
            left -= take
        return pieces

    def allocate(self, nbytes: int) -> list[Extent]:
        extents: list[Extent] = []
        try:
            for file, size in self.plan_pieces(nbytes):
                extents.append(Extent(file, self.arenas[file].alloc(size), size))
        except BaseException:
            self.free(extents)
            raise
        return extents

    def reserve(self, extents: list[Extent]) -> None:
        """Mark these extents used, all or none (ValueError when one overlaps a used one)."""
        done: list[Extent] = []
        try:
            for e in extents:
                self.arenas[e.file].reserve(e.file_offset, e.nbytes)
                done.append(e)
        except BaseException:
            self.free(done)
            raise

    def free(self, extents: list[Extent]) -> None:
        for e in extents:
            self.arenas[e.file].free(e.file_offset)

    def high_water(self, file: int) -> int:
        """End of the last used extent in a file (what the file must keep)."""
        stats = self.arenas[file].stats()
        return VIRTUAL_FILE_BYTES - stats.largest_free_bytes if stats.used_bytes else 0
