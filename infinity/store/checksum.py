"""Checksums of tensor data: xxh3-64 over fixed chunks, combined, so that chunks hash in parallel.

Scheme ``xxh3-64/16MiB``: cut the tensor's bytes into 16 MiB chunks (the last one shorter; an
empty tensor has none), take xxh3-64 of each, and take xxh3-64 of their 8-byte little-endian
digests concatenated. Each chunk can be hashed by any thread as soon as it is in (on a read the
store's hashing threads do this, in parallel), so little hashing is left after the last byte.

``xxh3-64`` (one pass over all bytes, the scheme of stores written before chunked hashing) is
still verified, sequentially.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import xxhash

from infinity.errors import IntegrityError

CHUNK_BYTES = 16 << 20
SCHEME = "xxh3-64/16MiB"
_FLAT = "xxh3-64"


def _array(piece) -> np.ndarray | bytes:
    if isinstance(piece, torch.Tensor):
        return piece.numpy() if piece.numel() else b""
    return piece


def chunk_cuts(at: int, n: int):
    """(offset into the piece, length) of each chunk-bounded part of ``n`` bytes at ``at``."""
    pos = 0
    while pos < n:
        step = min(n - pos, CHUNK_BYTES - (at + pos) % CHUNK_BYTES)
        yield pos, step
        pos += step


class ChunkHasher:
    """Digest of ``nbytes`` of tensor data fed as pieces ``add(at, piece)`` in any order, from
    any thread (each piece must lie within one chunk). ``digest()`` once everything is in."""

    def __init__(self, nbytes: int, scheme: str = SCHEME):
        if scheme not in (SCHEME, _FLAT):
            raise IntegrityError(
                f"checksum scheme {scheme!r} is unknown to this version (it knows {SCHEME!r} and "
                f"{_FLAT!r}); upgrade infinity"
            )
        self.nbytes, self.scheme = nbytes, scheme
        self._lock = threading.Lock()
        count = -(-nbytes // CHUNK_BYTES)
        self._digests: list[int | None] = [None] * count
        self._parts: dict[int, list] = {}  # chunk -> [(at, piece)] while it is incomplete
        self._flat: list = []  # the flat scheme hashes everything in order at the end

    def chunk_of(self, at: int, n: int) -> int:
        chunk = at // CHUNK_BYTES
        if n and (at + n - 1) // CHUNK_BYTES != chunk:
            raise ValueError(f"piece [{at}, {at + n}) crosses a {CHUNK_BYTES}-byte chunk")
        return chunk

    def add(self, at: int, piece) -> None:
        n = len(piece) if not isinstance(piece, torch.Tensor) else piece.numel()
        if n == 0:
            return
        if self.scheme == _FLAT:
            with self._lock:
                self._flat.append((at, piece))
            return
        chunk = self.chunk_of(at, n)
        size = min(CHUNK_BYTES, self.nbytes - chunk * CHUNK_BYTES)
        if n == size:  # the whole chunk at once: the common case, no bookkeeping
            self._digests[chunk] = xxhash.xxh3_64_intdigest(_array(piece))
            return
        with self._lock:
            parts = self._parts.setdefault(chunk, [])
            parts.append((at, piece))
            if sum(p.numel() if isinstance(p, torch.Tensor) else len(p) for _, p in parts) < size:
                return
            del self._parts[chunk]
        h = xxhash.xxh3_64()
        for _, p in sorted(parts, key=lambda item: item[0]):
            h.update(_array(p))
        self._digests[chunk] = h.intdigest()

    def update(self, at: int, piece) -> None:
        """Feed a piece that may span several chunks (cut here)."""
        n = len(piece) if not isinstance(piece, torch.Tensor) else piece.numel()
        for pos, step in chunk_cuts(at, n):
            self.add(at + pos, piece[pos : pos + step])

    def digest(self) -> str:
        if self.scheme == _FLAT:
            h = xxhash.xxh3_64()
            for _, p in sorted(self._flat, key=lambda item: item[0]):
                h.update(_array(p))
            return f"{_FLAT}:{h.hexdigest()}"
        missing = [i for i, d in enumerate(self._digests) if d is None]
        if missing:
            raise ValueError(f"chunks {missing[:8]} of {len(self._digests)} were never hashed")
        packed = np.array(self._digests, dtype="<u8").tobytes()
        return f"{SCHEME}:{xxhash.xxh3_64_hexdigest(packed)}"


def scheme_of(checksum: str) -> str:
    return checksum.rpartition(":")[0]


def checksum_tensor(data) -> str:
    """The ``SCHEME`` checksum of a CPU uint8 tensor or a bytes-like object."""
    n = data.numel() if isinstance(data, torch.Tensor) else len(data)
    hasher = ChunkHasher(n)
    hasher.update(0, data)
    return hasher.digest()
