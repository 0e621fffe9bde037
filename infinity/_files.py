"""Opening the files a user names (configs, checkpoint files): regular files only, bounded.

Why each flag: opening a FIFO for reading blocks until a writer comes, and a device such as
/dev/zero never reaches EOF, so ``O_NONBLOCK`` lets ``open`` return at once and ``fstat`` refuses
anything that is not a regular file before a byte is read. ``follow=False`` adds ``O_NOFOLLOW``:
the caller has resolved the path itself (convert decides which symlinks a checkpoint may hold),
and a final symlink that appears in between is refused instead of followed.
"""

from __future__ import annotations

import errno
import json
import os
import stat

from infinity.errors import ConfigError

MAX_CONFIG_BYTES = 64 << 20  # a config JSON; the largest real ones are a few hundred KiB

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def open_regular(path: str | os.PathLike, what: str, *, follow: bool = True) -> int:
    """A blocking read-only descriptor of the regular file ``path``; ConfigError naming ``what``
    and the path for anything else (FIFO, device, directory, a symlink when not ``follow``)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            raise ConfigError(
                f"{what} {path} is a symbolic link: infinity reads it only through a checked "
                "path; replace the link with the file it points to"
            ) from None
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = _KINDS.get(stat.S_IFMT(mode), f"not a regular file (mode {mode:o})")
        raise ConfigError(f"{what} {path} is {kind}, not a regular file: give the file itself")
    os.set_blocking(fd, True)
    return fd


def read_regular(
    path: str | os.PathLike, what: str, max_bytes: int = MAX_CONFIG_BYTES, *, follow: bool = True
) -> bytes:
    """The bytes of the regular file ``path``, refused (ConfigError) above ``max_bytes``."""
    with os.fdopen(open_regular(path, what, follow=follow), "rb") as f:
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


def load_json(path: str | os.PathLike, what: str, *, follow: bool = True):
    """The JSON value in the regular file ``path`` (at most MAX_CONFIG_BYTES); every way it can
    fail (unreadable, not text, not JSON, nested too deep, a number with too many digits) is one
    ConfigError naming the file."""
    text = decode_text(read_regular(path, what, follow=follow), path, what)
    try:
        return json.loads(text)
    except RecursionError:
        raise ConfigError(f"{what} {path} is nested too deeply to be a config") from None
    except ValueError as exc:  # JSONDecodeError, and ints over sys.get_int_max_str_digits()
        raise ConfigError(f"{what} {path} is not valid JSON: {exc}") from None
