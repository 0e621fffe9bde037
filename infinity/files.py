"""Opening files without surprises: regular files only, never through a final symbolic link
unless asked, and never blocking on a FIFO. The one place every package opens a file that a
user or a manifest names (configs, checkpoints, a store's own files, data files).

Why each flag: opening a FIFO for reading blocks until a writer comes, and a device such as
/dev/zero never reaches EOF, so ``O_NONBLOCK`` lets ``open`` return at once and ``fstat`` refuses
anything that is not a regular file before a byte is read. ``O_NOFOLLOW`` (unless
``follow=True``): a link planted where a file should be would send reads or writes to its target,
anywhere on the system.
"""

from __future__ import annotations

import errno
import json
import os
import stat

from infinity.errors import ConfigError

MAX_CONFIG_BYTES = 64 << 20  # a config JSON; the largest real ones are a few hundred KiB

_KINDS = (  # (test, what it is, errno)
    (stat.S_ISLNK, "a symbolic link", errno.ELOOP),
    (stat.S_ISDIR, "a directory", errno.EISDIR),
    (stat.S_ISFIFO, "a FIFO (named pipe)", errno.EINVAL),
    (stat.S_ISCHR, "a character device", errno.EINVAL),
    (stat.S_ISBLK, "a block device", errno.EINVAL),
    (stat.S_ISSOCK, "a socket", errno.EINVAL),
)


class NotRegularFileError(OSError):
    """``path`` is something other than a regular file; ``kind`` says what (an OSError with
    ELOOP for a link, EISDIR for a directory, EINVAL otherwise)."""

    def __init__(self, path: str, mode: int):
        self.kind, err = next(
            ((w, e) for test, w, e in _KINDS if test(mode)), (f"special (mode {mode:o})", 22)
        )
        super().__init__(err, f"{self.kind}, not a regular file", os.fspath(path))


def open_regular(
    path: str | os.PathLike, flags: int = os.O_RDONLY, mode: int = 0o644, *, follow: bool = False
) -> int:
    """A blocking descriptor of the regular file ``path`` opened with ``flags``; raises
    NotRegularFileError for anything else (a final link when not ``follow``), or the OSError of
    ``os.open``."""
    extra = os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags | extra, mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):  # ENXIO: a socket
            try:
                st = os.lstat(path) if not follow else os.stat(path)
            except OSError:
                raise exc from None
            if not stat.S_ISREG(st.st_mode):
                raise NotRegularFileError(path, st.st_mode) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(path, st.st_mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_config(path: str | os.PathLike, what: str, *, follow: bool = True) -> int:
    """``open_regular`` for reading a file the user named: every failure is one ConfigError
    naming ``what`` and the path."""
    try:
        return open_regular(path, follow=follow)
    except NotRegularFileError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(
                f"{what} {path} is a symbolic link: infinity reads it only through a checked "
                "path; replace the link with the file it points to"
            ) from None
        raise ConfigError(
            f"{what} {path} is {exc.kind}, not a regular file: give the file itself"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def read_regular(
    path: str | os.PathLike, what: str, max_bytes: int = MAX_CONFIG_BYTES, *, follow: bool = True
) -> bytes:
    """The bytes of the regular file ``path``, refused (ConfigError) above ``max_bytes``."""
    with os.fdopen(open_config(path, what, follow=follow), "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ConfigError(
            f"{what} {path} is over {max_bytes:,} bytes ({max_bytes / 2**20:g} MiB); no real "
            "config is that large: check that it is the right file"
        )
    return data


def decode_text(data: bytes, path: str | os.PathLike, what: str) -> str:
    """``data`` as UTF-8 text; ConfigError with the offset of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}): it is not a JSON file; check the path"
        ) from None


def load_json(
    path: str | os.PathLike, what: str, max_bytes: int = MAX_CONFIG_BYTES, *, follow: bool = True
):
    """The JSON value in the regular file ``path`` (at most ``max_bytes``); every way it can
    fail (unreadable, not text, not JSON, nested too deep, a number with too many digits) is one
    ConfigError naming the file."""
    text = decode_text(read_regular(path, what, max_bytes, follow=follow), path, what)
    try:
        return json.loads(text)
    except RecursionError:
        raise ConfigError(f"{what} {path} is nested too deeply to be a config") from None
    except ValueError as exc:  # JSONDecodeError, and ints over sys.get_int_max_str_digits()
        raise ConfigError(f"{what} {path} is not valid JSON: {exc}") from None
