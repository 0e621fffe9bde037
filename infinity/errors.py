"""The exceptions infinity raises; each message says what failed, with numbers, and the fix."""

from __future__ import annotations

import errno as _errno
import os


class InfinityError(Exception):
    """Base class of every error raised by infinity."""


class ConfigError(InfinityError, ValueError):
    """A configuration value or an argument is invalid."""


class CapacityError(InfinityError, MemoryError):
    """A budget (pinned pool, GPU tier, disk) cannot fit a request."""


class IntegrityError(InfinityError):
    """Stored bytes do not match their checksum."""


class StorageIOError(InfinityError, OSError):
    """A read or write failed or transferred fewer bytes than asked.

    Carries ``path``, ``file_offset``, ``nbytes`` and ``errno`` (0 when the OS gave none).
    """

    def __init__(self, path: str, file_offset: int, nbytes: int, err: int, detail: str = ""):
        name = _errno.errorcode.get(err, "") if err else ""
        reason = os.strerror(err) if err else "I/O error"
        message = f"{detail or reason}: {path!s} [offset {file_offset}, {nbytes} bytes]" + (
            f" ({name})" if name else ""
        )
        OSError.__init__(self, err, message)
        self.path = str(path)
        self.file_offset = file_offset
        self.nbytes = nbytes
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return (type(self), (self.path, self.file_offset, self.nbytes, self.errno, self.message))


class AioUnavailableError(InfinityError, ImportError):
    """DeepSpeed's async I/O op cannot be built or loaded (usually libaio is missing)."""
