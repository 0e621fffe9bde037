"""The two request routines of AioEngine (a lane runs one at a time); see aio.py's docstring."""

from __future__ import annotations

import errno
import os
import shutil

import torch

from infinity.config import ALIGNMENT_BYTES as A
from infinity.config import format_size
from infinity.errors import StorageIOError
from infinity.files import NotRegularFileError, open_regular
from infinity.io.copy import copy
from infinity.io.fsinfo import mount_of


def _down(x: int) -> int:
    return x // A * A


def _up(x: int) -> int:
    return -(-x // A) * A


def open_data_file(path: str, flags: int, file_offset: int, nbytes: int, verb: str) -> int:
    """``files.open_regular`` of a data file (no link followed, regular files only), with what
    is at ``path`` otherwise said in a StorageIOError."""
    try:
        return open_regular(path, flags)
    except NotRegularFileError as exc:
        if exc.errno == errno.ELOOP:
            detail = (
                "the path is a symbolic link; infinity opens data files without following links"
            )
            fix = "put the file itself at this path"
        else:
            detail = f"the path is {exc.kind}, not a regular file"
            fix = "fix the path or move what is there out of the way"
        raise StorageIOError(
            path, file_offset, nbytes, exc.errno, f"cannot open for {verb}: {detail} ({fix})"
        ) from None


def _open(engine, req, write: bool) -> int:
    n = req.buf.numel()
    flags = (os.O_RDWR | os.O_CREAT) if write else os.O_RDONLY
    verb = "writing" if write else "reading"
    try:
        # Our open is the check: DeepSpeed's handle re-opens the file by path itself after it,
        # for each op (O_DIRECT, following links), so a path swapped for a link in between is
        # not caught. The store's directory is its own; this keeps out links left in it.
        fd = open_data_file(req.path, flags, req.file_offset, n, verb)
    except StorageIOError:
        raise
    except OSError as exc:
        parent = os.path.dirname(os.path.abspath(req.path))
        detail = f"cannot open for {verb}: {exc.strerror}"
        if exc.errno == errno.ENOENT and not os.path.isdir(parent):
            detail += f" (directory {parent} does not exist; create it or fix the path)"
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            detail += f" ({parent} is not {'writable' if write else 'readable'} by this user)"
        raise StorageIOError(req.path, req.file_offset, n, exc.errno or 0, detail) from None
    try:
        engine._check_direct_io(fd, req)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _pread_exact(fd: int, req, start: int, nbytes: int) -> bytes:
    data = os.pread(fd, nbytes, start)
    if len(data) != nbytes:
        raise StorageIOError(
            req.path, start, nbytes, errno.EIO, f"short read: got {len(data)} of {nbytes} bytes"
        )
    return data


class _Pipe:
    """Double-buffered staging through a lane's two bounce halves, on CPU or one CUDA device."""

    def __init__(self, lane, req):
        self.lane, self.req = lane, req
        self.gpu = req.buf.is_cuda
        if self.gpu:
            self.stream, self.events = lane.stream_for(req.buf.device)
            self.stream.wait_event(req.ready)

    def half(self, k: int, nbytes: int) -> torch.Tensor:
        if self.gpu and self.events[k % 2] is not None:
            self.events[k % 2].synchronize()  # the copy that last used this half is done
        return self.lane.halves[k % 2][:nbytes]

    def copy(self, dst: torch.Tensor, src: torch.Tensor, k: int, wait: bool = False) -> None:
        """io.copy on the lane's stream (CPU: done on return); half k % 2 is busy until then."""
        event = copy(dst, src, self.stream if self.gpu else None)
        if self.gpu:
            self.events[k % 2] = event
            if wait:
                event.synchronize()

    def finish(self) -> None:
        if self.gpu:
            self.stream.synchronize()


def _chunks(lo: int, hi: int, size: int) -> list[tuple[int, int]]:
    return [(c, min(c + size, hi)) for c in range(lo, hi, size)]


# -- reads --------------------------------------------------------------------------------------
def run_read(engine, lane, req) -> int:
    n, off, path = req.buf.numel(), req.file_offset, req.path
    fd = _open(engine, req, write=False)
    try:
        size = os.fstat(fd).st_size
        end = off + n
        if n and end > size:
            raise StorageIOError(
                path,
                off,
                n,
                errno.EINVAL,
                f"read past end of file: the file has {size} bytes, the read asks for bytes "
                f"[{off}, {end}), {end - size} beyond the end",
            )
        if n == 0:
            return 0
        direct_end = _down(size)  # O_DIRECT reaches whole blocks only
        done = 0
        if off % A == 0 and engine.is_direct_buffer(lane, req.buf):
            done = max(0, min(_down(n), direct_end - off))
            if done:
                lane.submit(False, req.buf[:done], path, off)
                lane.wait(path, off, done)
        if done < n:
            _bounce_read(lane, req, fd, off + done, end, direct_end)
        return n
    finally:
        os.close(fd)


def _bounce_read(lane, req, fd: int, s: int, e: int, direct_end: int) -> None:
    base, path = req.file_offset, req.path
    pipe = _Pipe(lane, req)
    chunks = _chunks(_down(s), min(_up(e), direct_end), lane.chunk)

    def issue(k: int) -> None:
        c0, c1 = chunks[k]
        lane.submit(False, pipe.half(k, c1 - c0), path, c0, slot=k % 2)

    for k in range(min(2, len(chunks))):
        issue(k)
    for k, (c0, c1) in enumerate(chunks):
        lane.wait(path, c0, c1 - c0, slot=k % 2)  # chunk k+1 keeps the disk busy meanwhile
        x0, x1 = max(c0, s), min(c1, e)
        pipe.copy(req.buf[x0 - base : x1 - base], lane.halves[k % 2][x0 - c0 : x1 - c0], k)
        if k + 2 < len(chunks):
            issue(k + 2)  # waits for chunk k's copy to leave the half first
    tail = max(s, direct_end)
    if e > tail:  # the file's last partial block: beyond O_DIRECT's reach
        data = torch.frombuffer(bytearray(_pread_exact(fd, req, tail, e - tail)), dtype=torch.uint8)
        pipe.copy(req.buf[tail - base : e - base], data, len(chunks), wait=True)
    pipe.finish()


# -- writes -------------------------------------------------------------------------------------
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def _release_beyond(fd: int, start: int, end: int) -> None:
    """Give back blocks a failed reservation left past the old end of the file (ext4 keeps what
    a failed fallocate managed to allocate, which would leave the disk full)."""
    import ctypes

    if end <= start:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE, start, end - start)


def release_blocks(path: str, file_offset: int, nbytes: int) -> None:
    """Give back the disk blocks of ``[file_offset, file_offset + nbytes)`` (a hole; the file
    keeps its size). For data written by an operation that then failed, such as a put that ran
    out of space halfway."""
    fd = open_data_file(path, os.O_WRONLY, file_offset, nbytes, "releasing blocks")
    try:
        _release_beyond(fd, file_offset, file_offset + nbytes)
    finally:
        os.close(fd)


def _reserve(fd: int, req, lo: int, hi: int) -> None:
    """Allocate the blocks first: DeepSpeed's handle would drop an ENOSPC on the floor."""
    old = os.fstat(fd).st_size
    try:
        os.posix_fallocate(fd, lo, hi - lo)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
            return
        _release_beyond(fd, max(lo, _up(old)), hi)
        directory = os.path.dirname(os.path.abspath(req.path))
        detail = f"cannot reserve {hi - lo} bytes at offset {lo}: {exc.strerror}"
        if exc.errno == errno.ENOSPC:
            free = shutil.disk_usage(directory).free
            point = mount_of(directory)[0]
            detail = (
                f"disk full: the write needs up to {format_size(hi - lo)} of new blocks at "
                f"offset {lo}, {format_size(free)} free on {point}; free space or use another "
                "directory"
            )
        raise StorageIOError(
            req.path, req.file_offset, req.buf.numel(), exc.errno, detail
        ) from None


def run_write(engine, lane, req) -> int:
    n, off, path = req.buf.numel(), req.file_offset, req.path
    fd = _open(engine, req, write=True)
    try:
        if n == 0:
            return 0
        end = off + n
        # Growing the file and cutting it back happen under one lock per path, and a cut
        # never goes below another write's end (engine.growth: FileGrowth).
        growth = engine.growth(path)
        with growth.lock:
            old = os.fstat(fd).st_size
            _reserve(fd, req, _down(off), _up(end))
            record = growth.begin(end)
        final = max(old, end)
        ok = False
        try:
            done = 0
            if off % A == 0 and engine.is_direct_buffer(lane, req.buf):
                done = _down(n)
                if done:
                    lane.submit(True, req.buf[:done], path, off)
                    lane.wait(path, off, done)
            if done < n:
                _bounce_write(lane, req, fd, off + done, end, old)
            ok = True
        finally:
            # fallocate and O_DIRECT round the file up to whole blocks: cut it back to the exact
            # length (the old one if the write failed), unless another request has since made
            # the file longer (its own end then rules), never below another write's end.
            with growth.lock:
                target = max(final if ok else old, growth.finish(record, ok))
                size = os.fstat(fd).st_size
                if size != target and size == max(old, _up(end)):
                    os.ftruncate(fd, target)
        return n
    finally:
        os.close(fd)


def _bounce_write(lane, req, fd: int, s: int, e: int, old: int) -> None:
    base, path = req.file_offset, req.path
    pipe = _Pipe(lane, req)
    chunks = _chunks(_down(s), _up(e), lane.chunk)

    def keep_old(half: torch.Tensor, c0: int, a: int, b: int) -> None:
        """Bytes [a, b) of a block that the write does not cover keep the file's content."""
        half[a - c0 : b - c0].zero_()
        valid = min(b, old) - a
        if valid > 0:
            data = _pread_exact(fd, req, a, valid)
            half[a - c0 : a - c0 + valid].copy_(
                torch.frombuffer(bytearray(data), dtype=torch.uint8)
            )

    def stage(k: int) -> None:
        c0, c1 = chunks[k]
        half = pipe.half(k, c1 - c0)
        if c0 < s:
            keep_old(half, c0, c0, s)
        if c1 > e:
            keep_old(half, c0, e, c1)
        x0, x1 = max(c0, s), min(c1, e)
        pipe.copy(half[x0 - c0 : x1 - c0], req.buf[x0 - base : x1 - base], k, wait=True)

    def issue(k: int) -> None:
        stage(k)
        c0, c1 = chunks[k]
        lane.submit(True, lane.halves[k % 2][: c1 - c0], path, c0, slot=k % 2)

    for k in range(min(2, len(chunks))):
        issue(k)
    for k, (c0, c1) in enumerate(chunks):
        lane.wait(path, c0, c1 - c0, slot=k % 2)  # chunk k+1 keeps the disk busy meanwhile
        if k + 2 < len(chunks):
            issue(k + 2)
    pipe.finish()
