"""Checks made when a store is opened or called: arguments, directories, the writer lock."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat

from infinity.errors import ConfigError, InfinityError, StorageIOError
from infinity.io.fsinfo import MEMORY_FS, mount_of
from infinity.store import manifest as mf
from infinity.store._files import open_regular, read_file


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
            raise StorageIOError(
                path, 0, 0, exc.errno or 0, f"cannot create the store directory: {exc.strerror}"
            ) from None
    point, fstype, _ = mount_of(path)
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
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
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
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISLNK(os.lstat(path).st_mode):
                os.unlink(path)  # never write through a link; the lock is the directory's
        pid_fd = open_regular(path, os.O_RDWR | os.O_CREAT)
        try:
            os.ftruncate(pid_fd, 0)
            os.pwrite(pid_fd, f"{os.getpid()}\n".encode(), 0)
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
