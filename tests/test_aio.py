"""AioEngine on real files through DeepSpeed's aio handle: bit-exact at any size and offset."""

import os

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from infinity import ConfigError, StorageIOError
from infinity.io import PinnedPool
from infinity.io.aio import byte_view

AWKWARD = [1, 7, 4095, 4096, 4097, 3 * 4096 + 5, 256 * 1024 + 1, 1024 * 1024 + 4097]
OFFSETS = [0, 1, 4095, 4096, 4097, 12345]


def random_bytes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("nbytes", AWKWARD)
@pytest.mark.parametrize("offset", OFFSETS)
def test_roundtrip_pageable(engine, disk_dir, nbytes, offset):
    path = os.path.join(disk_dir, "f.bin")
    data = random_bytes(nbytes, nbytes + offset)
    assert engine.write(data, path, offset) == nbytes
    assert os.path.getsize(path) == offset + nbytes
    out = torch.empty(nbytes, dtype=torch.uint8)
    assert engine.read(out, path, offset) == nbytes
    assert torch.equal(out, data)


@pytest.mark.parametrize("nbytes", [4096, 4097, 64 * 4096, 64 * 4096 + 100, 1024 * 1024 + 1])
@pytest.mark.parametrize("offset", [0, 4096, 513])
def test_roundtrip_pinned_pool(engine, disk_dir, nbytes, offset):
    """Buffers from the pinned pool take DeepSpeed's direct path for their aligned part."""
    path = os.path.join(disk_dir, "p.bin")
    with PinnedPool(4 * 1024 * 1024) as pool:
        src, dst = pool.alloc(nbytes), pool.alloc(nbytes)
        src.copy_(random_bytes(nbytes, 7))
        engine.write(src, path, offset)
        dst.zero_()
        engine.read(dst, path, offset)
        assert engine.is_direct_buffer(engine._lanes[0], src)
        assert torch.equal(dst, src)
        pool.free(src)
        pool.free(dst)


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.int64,
        torch.bool,
        torch.float8_e4m3fn,
        torch.complex64,
    ],
)
def test_dtypes_and_shapes(engine, disk_dir, dtype):
    path = os.path.join(disk_dir, "t.bin")
    for i, shape in enumerate([(), (0,), (3, 5, 7), (1000, 33)]):
        src = random_bytes(torch.empty(shape, dtype=dtype).nbytes, i).view(dtype).reshape(shape)
        engine.write(src, path, 100 * i)
        out = torch.empty(shape, dtype=dtype)
        engine.read(out, path, 100 * i)
        assert torch.equal(byte_view(out), byte_view(src))


def test_write_keeps_neighbouring_bytes(engine, disk_dir):
    path = os.path.join(disk_dir, "n.bin")
    base = random_bytes(5 * 4096, 1)
    engine.write(base, path, 0)
    patch = random_bytes(3000, 2)
    engine.write(patch, path, 4000)  # straddles a block boundary
    expected = base.clone()
    expected[4000:7000] = patch
    out = torch.empty(5 * 4096, dtype=torch.uint8)
    engine.read(out, path, 0)
    assert torch.equal(out, expected)
    assert os.path.getsize(path) == 5 * 4096


def test_non_contiguous_write_is_stored_contiguous(engine, disk_dir):
    path = os.path.join(disk_dir, "nc.bin")
    src = torch.arange(64, dtype=torch.float32).reshape(8, 8).t()
    engine.write(src, path)
    out = torch.empty(8, 8, dtype=torch.float32)
    engine.read(out, path)
    assert torch.equal(out, src)


def test_futures_run_concurrently(engine, disk_dir):
    tensors = [random_bytes(100_000 + i, i) for i in range(8)]
    paths = [os.path.join(disk_dir, f"c{i}.bin") for i in range(8)]
    for fut in [engine.pwrite(t, p, 3) for t, p in zip(tensors, paths, strict=True)]:
        fut.result()
    outs = [torch.empty_like(t) for t in tensors]
    for fut in [engine.pread(o, p, 3) for o, p in zip(outs, paths, strict=True)]:
        assert fut.result() > 0
    assert all(torch.equal(a, b) for a, b in zip(outs, tensors, strict=True))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(
        st.tuples(st.integers(0, 40_000), st.integers(0, 20_000), st.integers(0, 2**31)),
        min_size=1,
        max_size=8,
    )
)
def test_random_writes_match_bytearray_model(engine, disk_dir, ops):
    path = os.path.join(disk_dir, "model.bin")
    if os.path.exists(path):
        os.unlink(path)
    model = bytearray()
    for offset, nbytes, seed in ops:
        data = random_bytes(nbytes, seed)
        engine.write(data, path, offset)
        if nbytes:
            if len(model) < offset + nbytes:
                model.extend(b"\0" * (offset + nbytes - len(model)))
            model[offset : offset + nbytes] = bytes(data.numpy())
        elif not os.path.exists(path):
            pytest.fail("a zero-byte write must still create the file")
    assert os.path.getsize(path) == len(model)
    out = torch.empty(len(model), dtype=torch.uint8)
    engine.read(out, path, 0)
    assert bytes(out.numpy()) == bytes(model)


# -- bad input ----------------------------------------------------------------------------------
def test_missing_directory(engine, tmp_path):
    path = str(tmp_path / "nope" / "f.bin")
    with pytest.raises(StorageIOError, match="does not exist") as info:
        engine.write(torch.ones(10, dtype=torch.uint8), path)
    assert info.value.errno == 2 and info.value.path == path and info.value.nbytes == 10
    with pytest.raises(StorageIOError, match="No such file"):
        engine.read(torch.empty(10, dtype=torch.uint8), path)


def test_read_past_end_of_file(engine, disk_dir):
    path = os.path.join(disk_dir, "short.bin")
    engine.write(torch.ones(5000, dtype=torch.uint8), path)
    with pytest.raises(StorageIOError, match=r"file has 5000 bytes.*\[4000, 6000\), 1000 beyond"):
        engine.read(torch.empty(2000, dtype=torch.uint8), path, 4000)


def test_bad_arguments(engine, disk_dir):
    path = os.path.join(disk_dir, "a.bin")
    with pytest.raises(ConfigError, match="non-negative"):
        engine.pread(torch.empty(4), path, -1)
    with pytest.raises(ConfigError, match="not contiguous"):
        engine.pread(torch.empty(4, 4).t(), path, 0)
    with pytest.raises(ConfigError, match="torch.Tensor"):
        engine.pwrite(b"bytes", path, 0)


def test_tmpfs_is_reported(engine, tmp_path):
    from infinity.io.fsinfo import mount_of

    shm = "/dev/shm"
    if not (os.path.isdir(shm) and mount_of(shm)[1] == "tmpfs" and os.access(shm, os.W_OK)):
        pytest.skip("no writable tmpfs at /dev/shm on this machine")
    path = os.path.join(shm, f"infinity-test-{os.getpid()}.bin")
    try:
        with pytest.raises(StorageIOError, match="/dev/shm is tmpfs: memory, not a disk"):
            engine.write(torch.ones(4096, dtype=torch.uint8), path)
    finally:
        if os.path.exists(path):
            os.unlink(path)


def test_read_only_directory(disk_dir):
    """A process that cannot write the directory gets EACCES with the path, not a silent no-op.

    Root ignores permission bits, so as root the child runs with an empty capability bounding
    set (util-linux setpriv): the same permission checks as an ordinary user."""
    import shutil
    import subprocess
    import sys

    ro = os.path.join(disk_dir, "ro")
    os.mkdir(ro)
    os.chmod(ro, 0o555)
    code = f"""
import sys, torch
from infinity import AioConfig, StorageIOError
from infinity.io import AioEngine
with AioEngine(AioConfig(bounce_buffer_bytes=1 << 20, lanes=1)) as eng:
    try:
        eng.write(torch.ones(10, dtype=torch.uint8), {os.path.join(ro, "x.bin")!r})
    except StorageIOError as exc:
        print("ERRNO", exc.errno, exc)
        sys.exit(0)
sys.exit("no error")
"""
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "util-linux's setpriv is needed to drop root's capabilities"
        cmd = [setpriv, "--bounding-set=-all", "--", *cmd]
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=300,
            env=dict(os.environ, TORCH_EXTENSIONS_DIR=_extensions_dir()),
        )
    finally:
        os.chmod(ro, 0o755)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ERRNO 13" in proc.stdout and "not writable by this user" in proc.stdout
    assert not os.path.exists(os.path.join(ro, "x.bin"))


def _extensions_dir() -> str:
    from torch.utils.cpp_extension import _get_build_directory

    return os.path.dirname(_get_build_directory("async_io", verbose=False))


@pytest.mark.slow
def test_one_gib_plus_one(disk_dir):
    """1 GiB + 1 byte at an odd offset, through the default configuration (several chunks)."""
    from infinity.io import AioEngine

    nbytes = 2**30 + 1
    path = os.path.join(disk_dir, "big.bin")
    data = random_bytes(nbytes, 3)
    with AioEngine() as eng:
        assert eng.write(data, path, 4097) == nbytes
        out = torch.empty(nbytes, dtype=torch.uint8)
        assert eng.read(out, path, 4097) == nbytes
    assert torch.equal(out, data)
    os.unlink(path)


def test_concurrent_writes_extending_one_file(disk_dir):
    """Disjoint ranges of one file written at once, each extending it, in any completion order."""
    from infinity import AioConfig
    from infinity.io import AioEngine

    path = os.path.join(disk_dir, "shared.bin")
    pieces = [(i * 3 * 4096, random_bytes(3 * 4096 - (i % 3) * 1000, i)) for i in range(24)]
    with AioEngine(
        AioConfig(lanes=4, bounce_buffer_bytes=64 * 1024, intra_op_parallelism=2)
    ) as eng:
        for fut in [eng.pwrite(t, path, off) for off, t in pieces]:
            fut.result()
        last_off, last = pieces[-1]
        assert os.path.getsize(path) == last_off + last.numel()
        for off, t in pieces:
            out = torch.empty_like(t)
            eng.read(out, path, off)
            assert torch.equal(out, t), off


def test_first_writes_from_many_threads_do_not_deadlock(disk_dir):
    """DeepSpeed 0.19.8 takes the GIL inside a call_once on its first write op while its
    async_pwrite binding holds the GIL: concurrent first writes deadlocked about one process in
    four before the engine serialised the first one. Ten fresh processes, each must finish."""
    import subprocess
    import sys

    child = os.path.join(os.path.dirname(__file__), "first_writes_child.py")
    for attempt in range(10):
        try:
            proc = subprocess.run(
                [sys.executable, child, disk_dir], capture_output=True, text=True, timeout=120
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"process {attempt} hung in its first concurrent writes")
        assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


ROUNDS = 150


def test_small_tail_writes_racing_never_cut_each_other(disk_dir):
    """Small writes (a few bytes to a few KiB, one per 4 KiB block) racing at the end of a file,
    in shuffled order: the length fix-up of one (cut back from its whole block) must never
    drop another's bytes. A cut decided from a size read before another write's fallocate
    once did (one in fifteen first write-backs of the optimizer; here in the first rounds)."""
    import random

    from infinity import AioConfig
    from infinity.io import AioEngine

    rng = random.Random(5)
    with AioEngine(AioConfig(lanes=8, intra_op_parallelism=1)) as eng:
        for round_ in range(ROUNDS):
            path = os.path.join(disk_dir, f"tail{round_}.bin")
            sizes = [rng.choice([32, 160, 384, 1024, 4096, 5000]) for _ in range(32)]
            offsets = [4096 * sum(-(-s // 4096) for s in sizes[:i]) for i in range(len(sizes))]
            pieces = [(o, random_bytes(s, round_ * 100 + i))
                      for i, (o, s) in enumerate(zip(offsets, sizes, strict=True))]  # fmt: skip
            rng.shuffle(pieces)
            for fut in [eng.pwrite(t, path, off) for off, t in pieces]:
                fut.result()
            end = max(off + t.numel() for off, t in pieces)
            assert os.path.getsize(path) == end, round_
            for off, t in pieces:
                out = torch.empty_like(t)
                eng.read(out, path, off)
                assert torch.equal(out, t), (round_, off)
            os.unlink(path)
