import dataclasses
import os
import tempfile

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def disk_dir(tmp_path):
    """A directory on a real filesystem that accepts O_DIRECT (tmp_path, or INFINITY_TEST_DIR)."""
    from infinity.io.fsinfo import probe_direct_io

    base = os.environ.get("INFINITY_TEST_DIR")
    if base:
        path = tempfile.mkdtemp(prefix="infinity-test-", dir=base)
    else:
        path = str(tmp_path)
    reason = probe_direct_io(path)
    if reason is not None:
        pytest.fail(
            f"{path} does not support O_DIRECT ({reason}); set INFINITY_TEST_DIR to a directory "
            "on ext4 or xfs"
        )
    return path


@pytest.fixture(scope="session")
def engine():
    from store_helpers import SMALL_AIO

    from infinity.io import AioEngine

    # small bounce chunks so that multi-chunk pipelines run on small tensors; 4 threads so that
    # the single-thread remainder handle is exercised too
    cfg = dataclasses.replace(SMALL_AIO, intra_op_parallelism=4)
    with AioEngine(cfg) as eng:
        yield eng


@pytest.fixture
def small_fs(tmp_path):
    """A 64 MiB ext4 filesystem, loop-mounted (needs root), for disk-full tests."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or not shutil.which("mkfs.ext4"):
        pytest.skip("needs root and mkfs.ext4 to loop-mount a small filesystem")
    image, mount = tmp_path / "fs.img", tmp_path / "mnt"
    mount.mkdir()
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    proc = subprocess.run(
        ["mount", "-o", "loop", str(image), str(mount)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot loop-mount here: {proc.stderr.strip()}")
    try:
        yield str(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
