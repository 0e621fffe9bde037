"""Chunked tensor checksums: any split, any order, any thread gives the one-shot digest."""

import threading

import hypothesis.strategies as st
import pytest
import torch
import xxhash
from hypothesis import given, settings

from infinity import IntegrityError
from infinity.store.checksum import CHUNK_BYTES, SCHEME, ChunkHasher, checksum_tensor

DATA = torch.randint(0, 256, (2 * CHUNK_BYTES + 12345,), dtype=torch.uint8)


def reference(data: torch.Tensor) -> str:
    """The scheme as written in checksum.py's docstring, computed the plain way."""
    raw = data.numpy().tobytes()
    digests = b"".join(
        xxhash.xxh3_64_intdigest(raw[i : i + CHUNK_BYTES]).to_bytes(8, "little")
        for i in range(0, len(raw), CHUNK_BYTES)
    )
    return f"{SCHEME}:{xxhash.xxh3_64_hexdigest(digests)}"


def test_matches_the_written_definition():
    assert checksum_tensor(DATA) == reference(DATA)
    assert checksum_tensor(DATA[:100]) == reference(DATA[:100])
    assert checksum_tensor(DATA[:0]) == reference(DATA[:0])
    assert checksum_tensor(DATA) != checksum_tensor(DATA[1:])
    flipped = DATA.clone()
    flipped[CHUNK_BYTES + 7] ^= 1  # a change in the middle chunk
    assert checksum_tensor(flipped) != checksum_tensor(DATA)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, DATA.numel() - 1), max_size=8, unique=True), st.randoms())
def test_any_split_in_any_order(cuts, rnd):
    """Pieces cut anywhere (then at chunk boundaries), fed shuffled, from several threads."""
    bounds = sorted({0, DATA.numel(), *cuts, *range(CHUNK_BYTES, DATA.numel(), CHUNK_BYTES)})
    pieces = list(zip(bounds, bounds[1:], strict=False))
    rnd.shuffle(pieces)
    hasher = ChunkHasher(DATA.numel())
    threads = [threading.Thread(target=hasher.add, args=(a, DATA[a:b])) for a, b in pieces]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert hasher.digest() == checksum_tensor(DATA)


def test_update_cuts_long_pieces_and_add_refuses_them():
    hasher = ChunkHasher(DATA.numel())
    hasher.update(0, DATA[:5])
    hasher.update(5, DATA[5:])  # spans all three chunks
    assert hasher.digest() == checksum_tensor(DATA)
    with pytest.raises(ValueError, match="crosses"):
        ChunkHasher(DATA.numel()).add(CHUNK_BYTES - 1, DATA[:2])


def test_missing_piece_is_an_error_not_a_digest():
    hasher = ChunkHasher(DATA.numel())
    hasher.add(0, DATA[:CHUNK_BYTES])
    with pytest.raises(ValueError, match=r"chunks \[1, 2\] of 3"):
        hasher.digest()


def test_flat_scheme_still_verifies_and_unknown_schemes_refused():
    hasher = ChunkHasher(1000, "xxh3-64")
    hasher.add(500, DATA[500:1000])
    hasher.add(0, DATA[:500])
    assert hasher.digest() == "xxh3-64:" + xxhash.xxh3_64_hexdigest(DATA[:1000].numpy())
    with pytest.raises(IntegrityError, match="sha999.*upgrade"):
        ChunkHasher(10, "sha999")
