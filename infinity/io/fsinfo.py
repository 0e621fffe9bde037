"""What the filesystem under a path can do: type, O_DIRECT, free space, block device and queue."""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from infinity.config import ALIGNMENT_BYTES

MEMORY_FS = {"tmpfs", "ramfs", "devtmpfs"}  # O_DIRECT may work (Linux >= 6.6) but it is RAM
_QUEUE_KEYS = (
    "scheduler",
    "nr_requests",
    "max_sectors_kb",
    "read_ahead_kb",
    "rotational",
    "logical_block_size",
    "physical_block_size",
    "nomerges",
)


@dataclass
class FsInfo:
    path: str
    mount_point: str
    fs_type: str
    device: str | None
    free_bytes: int
    total_bytes: int
    direct_io: bool
    direct_io_error: str | None
    block_device: str | None = None
    queue: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def mount_of(path: str | os.PathLike) -> tuple[str, str, str]:
    """(mount point, fs type, source device) of the mount holding ``path``: the longest mount
    point that contains it (of two at one point, the later: it is the one on top)."""
    real = os.path.realpath(path)
    best = ("/", "unknown", "")
    for part in psutil.disk_partitions(all=True):  # /proc/self/mounts, octal escapes decoded
        point = part.mountpoint
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, part.fstype, part.device)
    return best


def probe_direct_io(directory: str | os.PathLike) -> str | None:
    """None when O_DIRECT works in ``directory``; otherwise the reason."""
    try:
        fd, name = tempfile.mkstemp(prefix=".infinity-odirect-", dir=directory)
    except OSError as exc:
        return f"cannot create a file in {directory}: {exc.strerror} (errno {exc.errno})"
    os.close(fd)
    try:
        try:
            dfd = os.open(name, os.O_RDWR | os.O_DIRECT)
        except OSError as exc:
            return f"open(O_DIRECT) failed: {exc.strerror} (errno {exc.errno})"
        try:
            buf = mmap.mmap(-1, ALIGNMENT_BYTES)  # page-aligned
            written = os.pwrite(dfd, buf, 0)
            if written != ALIGNMENT_BYTES:
                return f"O_DIRECT write wrote {written} of {ALIGNMENT_BYTES} bytes"
        except OSError as exc:
            return f"O_DIRECT write failed: {exc.strerror} (errno {exc.errno})"
        finally:
            os.close(dfd)
    finally:
        os.unlink(name)
    return None


def _block_device_of(path: str) -> tuple[str | None, dict[str, str]]:
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    sys_dev = Path(f"/sys/dev/block/{major}:{minor}")
    if not sys_dev.exists():
        return None, {}
    node = sys_dev.resolve()
    queue_dir = node / "queue"
    if not queue_dir.exists() and (node.parent / "queue").exists():  # a partition
        queue_dir = node.parent / "queue"
        node = node.parent
    queue = {}
    for key in _QUEUE_KEYS:
        try:
            queue[key] = (queue_dir / key).read_text().strip()
        except OSError:
            pass
    return node.name, queue


def fs_info(path: str | os.PathLike) -> FsInfo:
    """Inspect the filesystem under ``path`` (which must exist)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(errno.ENOENT, f"not a directory: {path}", path)
    point, fstype, source = mount_of(path)
    usage = shutil.disk_usage(path)
    reason = probe_direct_io(path)
    device, queue = _block_device_of(path)
    return FsInfo(
        path=os.path.realpath(path),
        mount_point=point,
        fs_type=fstype,
        device=source or None,
        free_bytes=usage.free,
        total_bytes=usage.total,
        direct_io=reason is None,
        direct_io_error=reason,
        block_device=device,
        queue=queue,
    )
