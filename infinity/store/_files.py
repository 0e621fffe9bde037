"""Opening a store's own files: regular files only, never through a link, bounded reads."""

from __future__ import annotations

import errno
import os
import stat

from infinity.errors import ConfigError, IntegrityError, StorageIOError

MAX_METADATA_BYTES = 1 << 30  # a manifest of millions of keys is well below this


def open_regular(path: str, flags: int, mode: int = 0o644) -> int:
    """``os.open`` of a store file that refuses anything but a regular file: a symbolic link is
    not followed (it could point anywhere: writes would land in its target), and a FIFO or a
    device is refused before it is read (a FIFO would block forever, /dev/zero never ends)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StorageIOError(
                path,
                0,
                0,
                exc.errno,
                "is a symbolic link; a store opens its own files only, "
                "without following links: replace the link with the file itself",
            ) from None
        raise StorageIOError(path, 0, 0, exc.errno or 0, f"cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StorageIOError(
                path,
                0,
                0,
                errno.EINVAL,
                f"is {_kind(st.st_mode)}, not a regular file; a store "
                "holds regular files only: move it away",
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_file(path: str, missing_ok: bool = False) -> bytes | None:
    """The bytes of a small store file (manifest, member record), read without following links."""
    try:
        fd = open_regular(path, os.O_RDONLY)
    except StorageIOError as exc:
        if exc.errno == errno.ENOENT:
            if missing_ok:
                return None
            raise ConfigError(
                f"{os.path.dirname(path)} is not part of an infinity store "
                f"(no {os.path.basename(path)})"
            ) from None
        raise
    try:
        size = os.fstat(fd).st_size
        if size > MAX_METADATA_BYTES:
            raise IntegrityError(
                f"{path} is {size} bytes, more than any store's metadata "
                f"({MAX_METADATA_BYTES}); it is not an infinity store file"
            )
        chunks, left = [], size + 1
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def check_name(name, what: str) -> str:
    """A file name from a manifest: a plain name inside the store's directory, nothing else."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\0" in name:
        raise IntegrityError(
            f"{what} names the file {name!r}; a store's files are plain names inside its own "
            "directories: the manifest is damaged or was tampered with"
        )
    return name
