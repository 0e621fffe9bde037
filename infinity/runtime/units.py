"""Units: named byte ranges in one buffer, each viewed as a tensor. The runtime moves whole units
(one read, one host->device copy, one write-back); what a unit means (a layer, a matrix, a tile
of optimizer state) is its driver's business."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from infinity.config import ALIGNMENT_BYTES


@dataclass(frozen=True)
class Piece:
    """One stored tensor of a unit and where it sits in the unit's buffer."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # bytes into the unit's buffer, ALIGNMENT_BYTES-aligned

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


@dataclass(frozen=True)
class Unit:
    """What the scheduler calls one tensor: pieces that move together in one buffer."""

    name: str
    pieces: tuple[Piece, ...]
    nbytes: int  # its buffer: the pieces, each starting aligned

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.pieces]

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each stored tensor, by key, as a view of the unit's ``buffer``."""
        return {p.key: p.view(buffer) for p in self.pieces}


def pack(name: str, tensors: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]) -> Unit:
    """A unit of ``(key, dtype, shape)`` tensors laid out one after another, each aligned; a
    key listed twice (tied weights) gets one piece."""
    pieces, offset = [], 0
    for key, dtype, shape in {t[0]: t for t in tensors}.values():
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        pieces.append(Piece(key, dtype, tuple(shape), nbytes, offset))
        offset += -(-nbytes // ALIGNMENT_BYTES) * ALIGNMENT_BYTES
    return Unit(name, tuple(pieces), offset)
