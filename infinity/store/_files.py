"""Opening a store's own files: regular files only, never through a link, bounded reads."""

from __future__ import annotations

import errno
import os

from infinity import files
from infinity.errors import ConfigError, IntegrityError, StorageIOError

MAX_METADATA_BYTES = 1 << 30  # a manifest of millions of keys is well below this


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
        raise StorageIOError(path, 0, 0, exc.errno or 0, f"cannot open: {exc.strerror}") from None


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
