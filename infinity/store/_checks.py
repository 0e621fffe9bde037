"""Checks made when a store is opened or called: arguments, directories, the writer lock."""

from __future__ import annotations

import errno
import fcntl
import os

import torch

from infinity.errors import ConfigError, InfinityError, StorageIOError
from infinity.io.fsinfo import MEMORY_FS, mount_of
from infinity.store import manifest as mf


class StoreLockedError(InfinityError):
    """Another process has the store open for writing."""


def parse_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{device!r} is not a device: use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ConfigError(f"device {device!r} is not supported: use 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked, but torch sees no CUDA device")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA devices")
    return torch.device("cuda", index)


def check_key(key) -> None:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"keys are non-empty strings, got {key!r}")


def read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"{os.path.dirname(path)} is not part of an infinity store") from None


def check_directory(path: str, create: bool) -> None:
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
        os.mkdir(path)
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
    path = os.path.join(directory, mf.LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreLockedError(
            f"store {directory} is open for writing by another process (pid {holder}); close it "
            "there, or open this one with readonly=True"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
