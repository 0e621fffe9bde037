"""Opening a store's own files: regular files only, never through a link, bounded reads."""

from __future__ import annotations

import errno
import os
import shutil

from infinity import files
from infinity.config import format_size
from infinity.errors import ConfigError, IntegrityError, StorageIOError
from infinity.io.fsinfo import mount_of

MAX_METADATA_BYTES = 1 << 30  # a manifest of millions of keys is well below this
RESERVED = ("manifest.json", "member.json", "inplace.json", "LOCK")  # the store's own records


def io_error(exc: OSError, path: str, what: str, nbytes: int = 0) -> StorageIOError:
    """``exc`` of an operation on a store file as a StorageIOError that says what to do: a full
    disk with its free space and mount point, a read-only filesystem with the way to read it."""
    err = exc.errno or errno.EIO
    directory = os.path.dirname(os.path.abspath(path))
    if err in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = format_size(shutil.disk_usage(directory).free)
        except OSError:
            free = "unknown space"
        detail = (
            f"disk full: cannot {what} ({exc.strerror}); {free} free on "
            f"{mount_of(directory)[0]}: free space (a store's compact() gives back its unused "
            "tail) and retry; what was committed before stays as it was"
        )
    elif err == errno.EROFS:
        detail = (
            f"cannot {what}: {mount_of(directory)[0]} is mounted read-only; open the store "
            "with readonly=True to read it, or remount it read-write"
        )
    else:
        detail = f"cannot {what}: {exc.strerror or exc}"
    return StorageIOError(path, 0, nbytes, err, detail)


def open_regular(path: str, flags: int, mode: int = 0o644) -> int:
    """``files.open_regular`` of a store file, as a StorageIOError: a symbolic link is not
    followed (it could point anywhere: writes would land in its target), and a FIFO or a device
    is refused before it is read (a FIFO would block forever, /dev/zero never ends)."""
    try:
        return files.open_regular(path, flags, mode)
    except files.NotRegularFileError as exc:
        raise StorageIOError(
            path, 0, 0, exc.errno,
            "is a symbolic link; a store opens its own files only, without following links: "
            "replace the link with the file itself" if exc.errno == errno.ELOOP
            else f"is {exc.kind}; a store holds regular files only: move it away",
        ) from None  # fmt: skip
    except OSError as exc:
        raise io_error(exc, path, "open it") from None


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
    """A file name from a manifest: a plain name inside the store's directory, none of the
    store's own records (a data file named manifest.json would be written over it), nothing
    else."""
    plain = isinstance(name, str) and name not in ("", ".", "..") and not {"/", "\0"} & set(name)
    try:
        plain = plain and bool(os.fsencode(name)) and len(os.fsencode(name)) <= 255
    except UnicodeError:  # a lone surrogate: no file can have that name
        plain = False
    if not plain or name in RESERVED or name.endswith(".tmp"):
        raise IntegrityError(
            f"{what} names the data file {name!r}; a store's data files are plain names inside "
            "its own directories, other than its records (manifest.json, member.json, "
            "inplace.json, LOCK, *.tmp): the manifest is damaged or was tampered with"
        )
    return name
