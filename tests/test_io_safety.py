"""Bad input to the I/O layer: paths that are not regular files (a symbolic link must never lead
outside the store), pin requests beyond the memory there is, bench arguments checked up front."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from infinity import CapacityError, ConfigError, StorageIOError
from infinity.io import PinnedPool, release_blocks

LINK_MESSAGE = "is a symbolic link; infinity opens data files without following links"


def _outside(tmp_path, data: bytes = b"outside the store" * 300) -> Path:
    """A file the store must not touch, in a directory of its own."""
    other = tmp_path / "elsewhere"
    other.mkdir(exist_ok=True)
    target = other / "precious.bin"
    target.write_bytes(data)
    return target


# -- paths that are not regular files ----------------------------------------------------------
def test_read_through_symlink_is_refused(engine, disk_dir, tmp_path):
    target = _outside(tmp_path)
    link = os.path.join(disk_dir, "data.bin")
    os.symlink(target, link)
    with pytest.raises(StorageIOError, match=LINK_MESSAGE) as info:
        engine.read(torch.empty(100, dtype=torch.uint8), link)
    assert info.value.errno == errno.ELOOP and info.value.path == link


def test_write_through_symlink_leaves_target_alone(engine, disk_dir, tmp_path):
    data = b"outside the store" * 300
    target = _outside(tmp_path, data)
    link = os.path.join(disk_dir, "data.bin")
    os.symlink(target, link)
    with pytest.raises(StorageIOError, match=LINK_MESSAGE):
        engine.write(torch.zeros(8192, dtype=torch.uint8), link, 0)
    assert target.read_bytes() == data


def test_write_through_dangling_symlink_creates_nothing(engine, disk_dir, tmp_path):
    target = tmp_path / "elsewhere" / "new.bin"
    target.parent.mkdir()
    link = os.path.join(disk_dir, "data.bin")
    os.symlink(target, link)
    with pytest.raises(StorageIOError, match=LINK_MESSAGE):
        engine.write(torch.ones(10, dtype=torch.uint8), link)
    assert not target.exists()


def test_release_blocks_through_symlink_is_refused(engine, disk_dir, tmp_path):
    data = os.urandom(64 * 1024)
    target = _outside(tmp_path, data)
    link = os.path.join(disk_dir, "data.bin")
    os.symlink(target, link)
    with pytest.raises(StorageIOError, match=LINK_MESSAGE):
        release_blocks(link, 0, len(data))  # would punch a hole in the target
    assert target.read_bytes() == data


@pytest.mark.parametrize("write", [False, True])
def test_directory_is_named_not_blamed_on_o_direct(engine, disk_dir, write):
    path = os.path.join(disk_dir, "adir")
    os.mkdir(path)
    buf = torch.ones(4096, dtype=torch.uint8)
    with pytest.raises(StorageIOError, match="is a directory, not a regular file") as info:
        (engine.write if write else engine.read)(buf, path, 0)
    assert info.value.errno == errno.EISDIR and "O_DIRECT" not in str(info.value)


@pytest.mark.parametrize("write", [False, True])
def test_fifo_is_refused_without_hanging(engine, disk_dir, write):
    path = os.path.join(disk_dir, "pipe")
    os.mkfifo(path)
    buf = torch.ones(4096, dtype=torch.uint8)
    future = (engine.pwrite if write else engine.pread)(buf, path, 0)
    try:
        with pytest.raises(StorageIOError, match=r"is a FIFO \(named pipe\)"):
            future.result(timeout=60)
    finally:
        if not future.done():  # an open without O_NONBLOCK waits for a writer: release it
            os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))


def test_device_is_refused(engine):
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    with pytest.raises(StorageIOError, match="is a character device"):
        engine.read(torch.empty(4096, dtype=torch.uint8), "/dev/null")


# -- pin requests beyond the memory there is ----------------------------------------------------
def test_pins_beyond_memory_raise_instead_of_aborting():
    """In a child: DeepSpeed's allocator asserts (deepspeed_pin_tensor.cpp) and kills the process
    when a pin cannot be met, so the pool must refuse before it asks."""
    total = psutil.virtual_memory().total
    code = f"""
from infinity import AioConfig, CapacityError
from infinity.io import AioEngine, PinnedPool
try:
    PinnedPool({2 * total})
except CapacityError as exc:
    print("POOL", exc)
try:  # 256 lanes x 2 bounce buffers of total/64: 8x the machine's memory
    AioEngine(AioConfig(lanes=256, bounce_buffer_bytes={total // 64 // 2**20 * 2**20}))
except CapacityError as exc:
    print("ENGINE", exc)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("POOL", "ENGINE"))]
    assert [line.split()[0] for line in lines] == ["POOL", "ENGINE"], proc.stdout
    assert "of host memory available" in lines[0] and "total)" in lines[0]
    assert "lower the size asked for" in lines[0]


def test_pool_respects_cgroup_limit(monkeypatch):
    import infinity.io.pinned as pinned

    monkeypatch.setattr(pinned, "cgroup_memory", lambda: (2 << 30, 1 << 30))
    with pytest.raises(CapacityError, match=r"cannot pin 1\.00 GiB: 1\.00 GiB left under .*"):
        PinnedPool(1 << 30, kind="aligned")  # over 90% of what the cgroup has left
    with PinnedPool(512 << 20, kind="aligned") as pool:
        assert pool.capacity_bytes == 512 << 20


def test_cgroup_memory_reads_this_machine():
    from infinity.io.pinned import cgroup_memory

    found = cgroup_memory()
    assert found is None or 0 <= found[1] <= found[0]


# -- bench io: arguments checked before any work ------------------------------------------------
def _bench(disk_dir, **kw):
    from infinity import iobench

    calls = []
    args = dict(size_bytes=1 << 20, grid="quick", progress=calls.append) | kw
    with pytest.raises(ConfigError) as info:
        iobench.run(disk_dir, **args)
    assert calls == [], "the run started before the bad argument was found"
    assert not [n for n in os.listdir(disk_dir) if n.startswith("infinity-bench-")]
    return str(info.value)


def test_bench_refuses_zero_repeats(disk_dir):
    assert "--repeats must be a whole number >= 1, got 0" in _bench(disk_dir, repeats=0)


def test_bench_checks_output_path_first(disk_dir):
    missing = os.path.join(disk_dir, "no-such-dir", "out.json")
    message = _bench(disk_dir, output_path=missing)
    assert "does not exist" in message and "no-such-dir" in message
    assert "is a directory" in _bench(disk_dir, output_path=disk_dir)


def test_bench_size_beyond_memory(disk_dir, monkeypatch):
    from infinity import iobench

    monkeypatch.setattr(iobench, "pinnable_bytes", lambda: (256 << 20, "0.28 GiB available"))
    message = _bench(disk_dir, size_bytes=128 << 20)  # twice that, and the bounce buffers
    assert "--size 128.00 MiB needs" in message and "lower --size to at most" in message


# -- public seams -------------------------------------------------------------------------------
def test_packages_use_each_others_public_names():
    """No module reaches into another package's private (``_``) modules (issue 13)."""
    import ast

    import infinity
    from infinity import iobench

    cfg = {"block_size": 8 << 20, "queue_depth": 32, "intra_op_parallelism": 8}
    assert iobench.short_summary(cfg | {"single_submit": False}) == "bs=8M qd=32 p=8 ss=0"
    root = Path(infinity.__file__).resolve().parent
    reaching = []
    for path in root.rglob("*.py"):
        own = path.relative_to(root).parts[:-1]  # the package the module is in
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")[1:]  # below infinity
                private = [i for i, part in enumerate(parts) if part.startswith("_")]
                if name.startswith("infinity.") and private and parts[: private[0]] != list(own):
                    if parts != ["_core"]:  # the C++ core's loader, the package root's
                        reaching.append(f"{path.relative_to(root)} imports {name}")
    assert reaching == []
