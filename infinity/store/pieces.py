"""Moving one tensor's bytes to or from its extents: pieces over the paths, hashed as they land."""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from infinity.store.checksum import CHUNK_BYTES, chunk_cuts
from infinity.store.manifest import Extent


def transfer(
    op,
    files: list[str],
    raw: torch.Tensor,
    extents: list[Extent],
    step: int,
    hashers: ThreadPoolExecutor,
    write: bool,
    on_piece=None,
    on_done=None,
) -> None:
    """Move ``raw`` to or from its extents (``op``: the engine's pread or pwrite) in pieces of
    ``step`` bytes, cut at multiples of that size in the tensor (a multiple of
    checksum.CHUNK_BYTES), interleaved over the paths so that every drive works at once.
    ``on_piece(at, piece)`` runs in byte order on the calling thread while later pieces are
    still in flight (on a read, the last ``step`` bytes of each extent then go in single chunks,
    so that what it has left to do after the last byte is one chunk's); ``on_done(at, part)``
    runs for each checksum chunk of a finished piece on the ``hashers`` threads, in parallel, so
    that the aio lane takes its next request at once."""
    plans, pos = [], 0
    tail = not write and on_piece is not None
    for ext in extents:
        end = pos + ext.nbytes
        fine = max(pos, (end - step) // CHUNK_BYTES * CHUNK_BYTES) if tail else end
        cuts = sorted(
            {
                pos,
                *range((pos // step + 1) * step, fine, step),
                *range(max(fine, (pos // CHUNK_BYTES + 1) * CHUNK_BYTES), end, CHUNK_BYTES),
                fine,
                end,
            }
        )
        plans.append(
            [(a, ext.file, ext.file_offset + a - pos, b - a) for a, b in itertools.pairwise(cuts)]
        )
        pos += ext.nbytes
    futures, callbacks = {}, _Callbacks(on_done, hashers)
    for round_ in itertools.zip_longest(*plans):
        for piece in filter(None, round_):
            at, file, file_offset, n = piece
            futures[at] = op(raw[at : at + n], files[file], file_offset)
            callbacks.attach(futures[at], at, raw[at : at + n])
    try:
        for at, _, _, n in sorted(p for plan in plans for p in plan):
            if not write:
                futures[at].result()
            if on_piece is not None:
                on_piece(at, raw[at : at + n])
        for fut in futures.values():
            fut.result()
    finally:
        for fut in futures.values():  # no buffer may be reused under the disk
            fut.exception()
        callbacks.wait()  # nor under a hash still running


class _Callbacks:
    """Runs ``fn(at, part)`` for each checksum chunk of each successful piece on ``pool`` (not
    on the aio lane that completed the piece: it goes on to its next request); ``wait`` returns
    once all have run and raises the first error one of them hit."""

    def __init__(self, fn, pool: ThreadPoolExecutor):
        self.fn, self.pool, self.pending, self.error = fn, pool, 0, None
        self.cond = threading.Condition()

    def attach(self, future: Future, at: int, piece: torch.Tensor) -> None:
        if self.fn is None:
            return
        with self.cond:
            self.pending += 1
        future.add_done_callback(lambda f: self._split(f, at, piece))

    def _split(self, future: Future, at: int, piece: torch.Tensor) -> None:
        try:
            if future.exception() is None:
                for pos, step in chunk_cuts(at, piece.numel()):
                    with self.cond:
                        self.pending += 1
                    try:
                        self.pool.submit(self._run, at + pos, piece[pos : pos + step])
                    except BaseException:
                        self._finish()
                        raise
        except BaseException as exc:  # noqa: BLE001 (handed to the waiting thread)
            self._failed(exc)
        finally:
            self._finish()

    def _run(self, at: int, part: torch.Tensor) -> None:
        try:
            self.fn(at, part)
        except BaseException as exc:  # noqa: BLE001
            self._failed(exc)
        finally:
            self._finish()

    def _failed(self, exc: BaseException) -> None:
        with self.cond:
            self.error = self.error or exc

    def _finish(self) -> None:
        with self.cond:
            self.pending -= 1
            self.cond.notify_all()

    def wait(self) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.pending == 0)
        if self.error is not None:
            raise self.error
