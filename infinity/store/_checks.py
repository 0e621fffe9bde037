"""Checks made when a store is opened or called: arguments, directories, the writer lock."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterable

import torch

from infinity.errors import ConfigError, InfinityError, StorageIOError
from infinity.io.aio import byte_view
from infinity.io.fsinfo import MEMORY_FS, mount_of
from infinity.store import manifest as mf
from infinity.store._files import io_error, open_regular, read_file

# kernel interfaces, not storage: a store there would fail in odd ways (no room for files)
PSEUDO_FS = {"proc", "sysfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs"}
PSEUDO_FS |= {"configfs", "bpf", "pstore", "mqueue", "efivarfs", "fusectl", "binfmt_misc"}


class StoreLockedError(InfinityError):
    """Another process has the store open for writing."""


def check_key(key) -> None:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"keys are non-empty strings, got {key!r}")


def check_path_arg(path) -> str:
    """A store directory argument: a non-empty str or os.PathLike naming no NUL byte."""
    if isinstance(path, bytes) or not isinstance(path, str | os.PathLike):
        raise ConfigError(f"a store path is a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not isinstance(path, str) or not path or "\0" in path:
        raise ConfigError(f"store path {path!r} is empty or holds a NUL byte")
    try:
        os.fsencode(path)
    except UnicodeError:
        raise ConfigError(
            f"store path {path!r} cannot be a file name here (not encodable)"
        ) from None
    return os.path.abspath(path)


def check_distinct(paths: list[str]) -> None:
    """Each path of a striped store is its own directory (not the same one twice, nor a link)."""
    seen: dict[tuple[int, int], str] = {}
    for path in paths:
        st = os.stat(path)
        other = seen.setdefault((st.st_dev, st.st_ino), path)
        if other != path or paths.count(path) > 1:
            raise ConfigError(
                f"the store's paths must be distinct directories: {other} and {path} are the "
                "same directory"
            )


def check_directory(path: str, create: bool) -> None:
    if os.path.lexists(path) and not os.path.isdir(path):
        raise StorageIOError(
            path,
            0,
            0,
            errno.ENOTDIR,
            "is not a directory; a store is a directory: give another path",
        )
    if not os.path.isdir(path):
        parent = os.path.dirname(path)
        if not create or not os.path.isdir(parent):
            raise StorageIOError(
                path,
                0,
                0,
                errno.ENOENT,
                f"store directory does not exist (nor its parent {parent})"
                if create
                else "store directory does not exist",
            )
        try:
            os.mkdir(path)
        except OSError as exc:
            raise io_error(exc, path, "create the store directory") from None
    point, fstype, _ = mount_of(path)
    if fstype in PSEUDO_FS:
        raise StorageIOError(
            path,
            0,
            0,
            errno.EINVAL,
            f"{point} is {fstype}, a kernel interface, not storage: give a directory on a disk",
        )
    if fstype in MEMORY_FS and os.environ.get("INFINITY_ALLOW_TMPFS") != "1":
        raise StorageIOError(
            path,
            0,
            0,
            errno.EINVAL,
            f"{point} is {fstype}: memory, not a disk; put the store on an NVMe "
            "drive (ext4 or xfs)",
        )


def take_lock(directory: str) -> int:
    """Lock the store's first directory for the one writer. The lock is on the directory itself
    (flock): unlike a LOCK file, it cannot be deleted or replaced out from under its holder, so
    a second writer can never open beside the first. LOCK names the holder's pid, for messages."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise io_error(exc, directory, "open the store directory") from None
    st = os.fstat(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = _lock_holder(os.path.join(directory, mf.LOCK))
        where = (
            "this process already has it open for writing (close that TieredStore first)"
            if holder == str(os.getpid()) or (st.st_dev, st.st_ino) in _LOCKED_HERE
            else f"it is open for writing by another process (pid {holder}); close it there"
        )
        raise StoreLockedError(
            f"store {directory}: {where}, or open this one with readonly=True"
        ) from None
    try:
        path = os.path.join(directory, mf.LOCK)
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                os.unlink(path)  # never write through a link; the lock is the directory's
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise io_error(exc, path, "replace the link planted as LOCK") from None
        pid_fd = open_regular(path, os.O_RDWR | os.O_CREAT)
        try:
            os.ftruncate(pid_fd, 0)
            os.pwrite(pid_fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            raise io_error(exc, path, "write the writer's pid") from None
        finally:
            os.close(pid_fd)
    except BaseException:
        os.close(fd)
        raise
    _LOCKED_HERE.add((st.st_dev, st.st_ino))
    return fd


def writer_alive(directory: str) -> bool:
    """Whether a process holds the store's writer lock (``take_lock``) now."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the shared lock taken to ask
    return False


def release_lock(fd: int) -> None:
    st = os.fstat(fd)
    _LOCKED_HERE.discard((st.st_dev, st.st_ino))
    os.close(fd)  # closing releases the flock


_LOCKED_HERE: set[tuple[int, int]] = set()  # store directories this process holds for writing


def _lock_holder(path: str) -> str:
    try:
        data = read_file(path, missing_ok=True) or b""
    except InfinityError:
        data = b""
    return data[:64].decode(errors="replace").strip() or "unknown"


# -- arguments of the store's calls -----------------------------------------------------------
def host_bytes(src: torch.Tensor) -> torch.Tensor:
    """The bytes of ``src`` in host memory, as a flat uint8 view (a copy only if needed)."""
    return byte_view(src.contiguous() if src.device.type == "cpu" else src.to("cpu"))


def listed(verb: str, what: str, items) -> list:
    """``items`` (a list, tuple or other iterable of them) as a list; a str, a tensor or None
    is refused rather than taken apart."""
    if isinstance(items, str | bytes | torch.Tensor) or not isinstance(items, Iterable):
        raise ConfigError(
            f"{verb} takes a list of {what}, got a {type(items).__name__}; wrap one in a list"
        )
    return list(items)


def pairs(verb: str, keys, items, what: str) -> tuple[list, list]:
    keys, items = listed(verb, "keys", keys), listed(verb, f"{what}s", items)
    if len(keys) != len(items):
        raise ConfigError(
            f"{verb} needs one {what} per key: {len(keys)} keys, {len(items)} {what}s"
        )
    return keys, items


def dense(key: str, tensor) -> torch.Tensor:
    """The plain strided tensor a put stores (conjugate and negative views resolved)."""
    if not isinstance(tensor, torch.Tensor):
        raise ConfigError(f"put({key!r}) expects a torch.Tensor, got {type(tensor).__name__}")
    kind = (
        "a quantized"
        if tensor.is_quantized
        else "a nested"
        if tensor.is_nested
        else "a meta"
        if tensor.is_meta
        else f"a {tensor.layout}"
        if tensor.layout != torch.strided
        else f"a {tensor.device.type}"
        if tensor.device.type not in ("cpu", "cuda")
        else None
    )
    if kind is not None:
        raise ConfigError(
            f"put({key!r}): {kind} tensor has no plain bytes to store; put a dense CPU or CUDA "
            "tensor (dequantize(), todense(), or the real data instead of the meta device)"
        )
    return tensor.detach().resolve_conj().resolve_neg()
