"""Configuration: frozen, validated dataclasses and size parsing.

Precedence for every knob: explicit argument > ``INFINITY_*`` environment variable > default.

| field                              | environment variable              | default |
| ---------------------------------- | --------------------------------- | ------- |
| AioConfig.block_size_bytes         | INFINITY_AIO_BLOCK_SIZE           | 8 MiB   |
| AioConfig.queue_depth              | INFINITY_AIO_QUEUE_DEPTH          | 32      |
| AioConfig.intra_op_parallelism     | INFINITY_AIO_INTRA_OP_PARALLELISM | 8       |
| AioConfig.single_submit            | INFINITY_AIO_SINGLE_SUBMIT        | false   |
| AioConfig.overlap_events           | INFINITY_AIO_OVERLAP_EVENTS       | true    |
| AioConfig.bounce_buffer_bytes      | INFINITY_AIO_BOUNCE_BUFFER        | 64 MiB  |
| AioConfig.lanes                    | INFINITY_AIO_LANES                | 2       |
| AioConfig.use_gds                  | INFINITY_AIO_USE_GDS              | false   |
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from infinity.errors import ConfigError

ALIGNMENT_BYTES = 4096  # O_DIRECT alignment used for buffers, offsets and sizes
MAX_BLOCK_BYTES = 1 << 30  # AioConfig.block_size_bytes (far past it DeepSpeed's handle fails)
MAX_LANES = 256  # AioConfig.lanes: each lane owns two bounce buffers and its handles' threads
MAX_INTRA_OP_PARALLELISM = 256  # AioConfig.intra_op_parallelism: threads of one handle

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str) -> int:
    """Parse ``4096``, ``"8MiB"``, ``"1.5GB"``, ``"3e8"`` into a number of bytes.

    Units are case-insensitive. A bare letter is decimal, like its B spelling: ``"4G"`` ==
    ``"4GB"`` == 4e9 bytes (K, M, G, T: powers of 1000). Binary units take an i:
    ``"4Gi"`` == ``"4GiB"`` == 4 * 2**30 bytes. (Kubernetes' convention; dd and docker read
    ``4G`` as GiB, so spell GiB where GiB is meant.) The one size parser: the CLI, configs and
    bench/ all use it."""
    if isinstance(value, bool):
        raise ConfigError(f"size must be a number of bytes or a string like '8GiB', got {value!r}")
    if isinstance(value, int):
        number, unit = float(value), ""
    elif isinstance(value, float):
        number, unit = value, ""
    else:
        match = _SIZE_RE.match(str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ConfigError(
                f"cannot parse size {value!r}: use bytes or a unit such as 4096, '64KiB', '8MiB', "
                "'1.5GB', '4GiB'"
            )
        number, unit = float(match.group(1)), match.group(2).lower()
    nbytes = number * _UNITS[unit]
    if not math.isfinite(nbytes) or nbytes < 0 or nbytes != int(nbytes):
        raise ConfigError(f"size {value!r} is not a whole, non-negative number of bytes")
    return int(nbytes)


def format_size(nbytes: int | float) -> str:
    """``format_size(3 * 2**30) == '3.00 GiB'``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _env(name: str, default: Any, kind: type) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if kind is bool:
        low = raw.strip().lower()
        if low in {"1", "true", "yes", "on"}:
            return True
        if low in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(
            f"environment variable {name}={raw!r} is not a boolean (use 1/0, true/false or yes/no)"
        )
    if kind is int and name.endswith(("SIZE", "BUFFER", "BYTES")):
        return parse_size(raw)
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not a {kind.__name__}") from None


def check_bools(config, names) -> None:
    """Each field in ``names`` of the dataclass ``config`` is a bool (True/False, not "no" or
    1: a string such as "no" would read as true)."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise ConfigError(
                f"{type(config).__name__}.{name} must be True or False, got {value!r} "
                f"({type(value).__name__}); environment variables take 1/0, true/false, yes/no"
            )


def from_dict(cls, data: dict[str, Any]):
    """Build the config dataclass ``cls`` from a dict, refusing unknown keys (typos)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(known)}")
    return cls(**data)


def from_env(name: str, default: Any, kind: type):
    """A dataclass field whose default is the environment variable ``name`` (parsed as ``kind``)
    when set, else ``default``: explicit argument > INFINITY_* variable > default."""
    return field(default_factory=lambda: _env(name, default, kind))


@dataclass(frozen=True)
class AioConfig:
    """Settings of DeepSpeed's aio handle, plus how infinity's engine uses it.

    The first five fields are DeepSpeed's ``aio`` config section (``intra_op_parallelism`` is the
    key DeepSpeed reads; the old ``thread_count`` is silently ignored by it).
    ``bounce_buffer_bytes`` is the pinned staging chunk per lane (two per lane, double-buffered)
    used for GPU tensors and for unaligned or unpinned transfers; ``lanes`` is how many requests
    run at once, each with its own handle.
    """

    block_size_bytes: int = from_env("INFINITY_AIO_BLOCK_SIZE", 8 * 2**20, int)
    queue_depth: int = from_env("INFINITY_AIO_QUEUE_DEPTH", 32, int)
    intra_op_parallelism: int = from_env("INFINITY_AIO_INTRA_OP_PARALLELISM", 8, int)
    single_submit: bool = from_env("INFINITY_AIO_SINGLE_SUBMIT", False, bool)
    overlap_events: bool = from_env("INFINITY_AIO_OVERLAP_EVENTS", True, bool)
    bounce_buffer_bytes: int = from_env("INFINITY_AIO_BOUNCE_BUFFER", 64 * 2**20, int)
    lanes: int = from_env("INFINITY_AIO_LANES", 2, int)
    use_gds: bool = from_env("INFINITY_AIO_USE_GDS", False, bool)

    def __post_init__(self) -> None:
        for name in ("block_size_bytes", "bounce_buffer_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int):
                try:
                    object.__setattr__(self, name, parse_size(value))
                except ConfigError as exc:
                    raise ConfigError(f"AioConfig.{name}: {exc}") from None
        ints = ("block_size_bytes", "queue_depth", "intra_op_parallelism", "lanes")
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"AioConfig.{name} must be a positive integer, got {value!r}")
        check_bools(self, ("single_submit", "overlap_events", "use_gds"))
        if self.block_size_bytes > MAX_BLOCK_BYTES:
            raise ConfigError(
                f"AioConfig.block_size_bytes={self.block_size_bytes} exceeds "
                f"{format_size(MAX_BLOCK_BYTES)}; 1MiB to 8MiB saturate NVMe drives"
            )
        if self.block_size_bytes % ALIGNMENT_BYTES:
            raise ConfigError(
                f"AioConfig.block_size_bytes={self.block_size_bytes} is not a multiple of "
                f"{ALIGNMENT_BYTES} (O_DIRECT alignment); use e.g. 1MiB or 8MiB"
            )
        if self.queue_depth > 4096:
            raise ConfigError(f"AioConfig.queue_depth={self.queue_depth} exceeds 4096")
        if self.intra_op_parallelism > MAX_INTRA_OP_PARALLELISM:
            raise ConfigError(
                f"AioConfig.intra_op_parallelism={self.intra_op_parallelism} exceeds "
                f"{MAX_INTRA_OP_PARALLELISM} threads per handle; 8 saturates most NVMe drives"
            )
        if self.lanes > MAX_LANES:
            raise ConfigError(
                f"AioConfig.lanes={self.lanes} exceeds {MAX_LANES}: each lane owns two pinned "
                f"bounce buffers of bounce_buffer_bytes and up to 2 x (intra_op_parallelism + 1) "
                "threads; 2 to 8 lanes keep a drive busy"
            )
        unit = self.chunk_unit_bytes
        if self.bounce_buffer_bytes < unit:
            raise ConfigError(
                f"AioConfig.bounce_buffer_bytes={self.bounce_buffer_bytes} is smaller than one "
                f"aligned unit per thread ({ALIGNMENT_BYTES} x intra_op_parallelism "
                f"{self.intra_op_parallelism} = {unit}); raise it (64MiB is a good default)"
            )

    @property
    def chunk_unit_bytes(self) -> int:
        """Granule of a parallel op: each of the handle's threads gets an aligned share."""
        return ALIGNMENT_BYTES * self.intra_op_parallelism

    @property
    def bounce_chunk_bytes(self) -> int:
        """``bounce_buffer_bytes`` rounded down to a whole number of parallel granules."""
        return self.bounce_buffer_bytes // self.chunk_unit_bytes * self.chunk_unit_bytes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AioConfig:
        return from_dict(cls, data)

    def deepspeed_section(self) -> dict[str, Any]:
        """This config as the ``aio`` section of a DeepSpeed config."""
        return {
            "block_size": self.block_size_bytes,
            "queue_depth": self.queue_depth,
            "intra_op_parallelism": self.intra_op_parallelism,
            "single_submit": self.single_submit,
            "overlap_events": self.overlap_events,
            "use_gds": self.use_gds,
        }


def parse_device(device):
    """``device`` as a torch.device that exists here: "cpu", "cuda" (the current one) or
    "cuda:N"; ConfigError naming what is wrong otherwise."""
    import torch  # not at import time: `import infinity` must not load torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{device!r} is not a device: use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ConfigError(f"device {device!r} is not supported: use 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked, but torch sees no CUDA device")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA devices")
    return torch.device("cuda", index)
