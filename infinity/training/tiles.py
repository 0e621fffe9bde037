"""Tiles: an optimizer's fp32 state cut into runtime units of about ``tile_bytes`` each.

A parameter's state is [master | exp_avg | exp_avg_sq] (fp32, flat), or [exp_avg | exp_avg_sq]
when the parameter is itself an fp32 tensor on the CPU (the update runs on it in place: a
second fp32 copy would cost a third more disk and I/O for nothing). Parameters of one param
group are packed in order into tiles; a parameter larger than a tile is cut into slices of
whole ``SLICE_ELEMS`` runs (AdamW is elementwise, so the slices' updates are the parameter's).
Tiles never span groups (one set of hyperparameters per update call).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infinity.errors import ConfigError
from infinity.runtime import Unit, pack

SLICE_ELEMS = 1024  # slices of a cut parameter are whole runs of this many elements (4 KiB fp32)
STATES = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class Slice:
    """Elements ``[start, start + numel)`` of parameter ``param`` (flat) and their state keys."""

    param: int  # index in the optimizer's parameter order (the state_dict's numbering)
    start: int
    numel: int
    master: bool  # an fp32 master copy is stored (the parameter is not fp32 on the CPU)
    key: str  # prefix of its state keys

    @property
    def keys(self) -> dict[str, str]:
        names = ("master", *STATES) if self.master else STATES
        return {name: f"{self.key}/{name}" for name in names}


@dataclass(frozen=True)
class Tile:
    group: int
    slices: tuple[Slice, ...]
    unit: Unit


def needs_master(p: torch.Tensor) -> bool:
    return p.dtype != torch.float32 or p.device.type != "cpu"


def check_param(index: int, p: torch.Tensor) -> None:
    if not p.is_floating_point():
        raise ConfigError(
            f"parameter {index} is {p.dtype}: OffloadedAdamW updates floating-point parameters"
        )
    if not p.is_contiguous():
        raise ConfigError(
            f"parameter {index} {tuple(p.shape)} is not contiguous (strides {p.stride()}): "
            "its state is stored flat; make it contiguous before building the optimizer"
        )


def build_tiles(groups: list[list[torch.Tensor]], tile_bytes: int, prefix: str) -> list[Tile]:
    """Tiles over the parameters of ``groups`` (lists of parameters, in order). Parameters with
    ``requires_grad=False`` get no state (a frozen base model costs nothing)."""
    tiles: list[Tile] = []
    index = 0
    for g, params in enumerate(groups):
        current: list[Slice] = []
        used = 0
        for p in params:
            check_param(index, p)
            if p.requires_grad and p.numel():
                master = needs_master(p)
                per_elem = 4 * (3 if master else 2)
                most = max(SLICE_ELEMS, tile_bytes // per_elem // SLICE_ELEMS * SLICE_ELEMS)
                cuts = list(range(0, p.numel(), most))
                for k, start in enumerate(cuts):
                    numel = min(most, p.numel() - start)
                    key = f"{prefix}p{index}" + (f".{k}" if len(cuts) > 1 else "")
                    if current and used + numel * per_elem > tile_bytes:
                        tiles.append(_tile(len(tiles), g, current))
                        current, used = [], 0
                    current.append(Slice(index, start, numel, master, key))
                    used += numel * per_elem
            index += 1
        if current:
            tiles.append(_tile(len(tiles), g, current))
    return tiles


def _tile(number: int, group: int, slices: list[Slice]) -> Tile:
    specs = [(key, torch.float32, (s.numel,)) for s in slices for key in s.keys.values()]
    return Tile(group, tuple(slices), pack(f"tile{number}", specs))


def layout_of(tiles: list[Tile]) -> list[list]:
    """What a state_dict records of the tiles, to check that it belongs to this model."""
    return [[s.key, s.param, s.start, s.numel, s.master] for t in tiles for s in t.slices]
