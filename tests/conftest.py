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
    from infinity import AioConfig
    from infinity.io import AioEngine

    # small bounce chunks so that multi-chunk pipelines run on small tensors
    cfg = AioConfig(
        block_size_bytes=64 * 1024,
        queue_depth=8,
        intra_op_parallelism=4,
        bounce_buffer_bytes=256 * 1024,
        lanes=2,
    )
    with AioEngine(cfg) as eng:
        yield eng
