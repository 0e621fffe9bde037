"""StoreConfig and StoreStats."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from infinity.config import AioConfig, check_bools, format_size, from_dict, from_env, parse_size
from infinity.errors import ConfigError

MAX_SIZE_BYTES = 1 << 50  # a tier budget or stripe size past any machine (1 PiB): a typo
MAX_IO_THREADS = 256


def _store_aio() -> AioConfig:
    """The store keeps 4 pieces in flight unless INFINITY_AIO_LANES says otherwise."""
    import os

    return AioConfig() if os.environ.get("INFINITY_AIO_LANES") else AioConfig(lanes=4)


@dataclass(frozen=True)
class StoreConfig:
    """Budgets and behaviour of a TieredStore.

    ``gpu_bytes``/``pinned_bytes`` bound the GPU and pinned-CPU tiers (INFINITY_GPU_BYTES,
    INFINITY_PINNED_BYTES); ``verify_checksums`` checks every read from NVMe
    (INFINITY_VERIFY_CHECKSUMS); a tensor of at least ``len(paths) * stripe_min_bytes`` is striped
    over all paths; ``io_threads`` runs prefetches.
    """

    gpu_bytes: int = from_env("INFINITY_GPU_BYTES", 0, int)
    pinned_bytes: int = from_env("INFINITY_PINNED_BYTES", 256 << 20, int)
    aio: AioConfig = field(default_factory=lambda: _store_aio())
    verify_checksums: bool = from_env("INFINITY_VERIFY_CHECKSUMS", True, bool)
    stripe_min_bytes: int = 4 << 20
    io_threads: int = 4

    def __post_init__(self) -> None:
        for name in ("gpu_bytes", "pinned_bytes", "stripe_min_bytes"):
            value = raw = getattr(self, name)
            if isinstance(value, str):
                try:
                    value = parse_size(value)
                except ConfigError as exc:
                    raise ConfigError(f"StoreConfig.{name}: {exc}") from None
                object.__setattr__(self, name, value)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"StoreConfig.{name} must be a size >= 0, got {_shown(value)}")
            if value > MAX_SIZE_BYTES:
                raise ConfigError(
                    f"StoreConfig.{name}={_shown(raw)} (about 2**{value.bit_length() - 1} bytes) "
                    f"is over {format_size(MAX_SIZE_BYTES)}, more than any machine has: check the "
                    "value (sizes take units, such as '8GiB')"
                )
        if isinstance(self.aio, dict):
            object.__setattr__(self, "aio", AioConfig.from_dict(self.aio))
        if not isinstance(self.aio, AioConfig):
            raise ConfigError(
                f"StoreConfig.aio must be an AioConfig (or a dict of its fields), got "
                f"{self.aio!r} ({type(self.aio).__name__})"
            )
        check_bools(self, ("verify_checksums",))
        if self.stripe_min_bytes < 4096:
            raise ConfigError(f"StoreConfig.stripe_min_bytes={self.stripe_min_bytes} < 4096")
        threads = self.io_threads
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"StoreConfig.io_threads must be >= 1, got {threads!r}")
        if threads > MAX_IO_THREADS:
            raise ConfigError(
                f"StoreConfig.io_threads={threads} exceeds {MAX_IO_THREADS}; the aio lanes do "
                "the I/O, a few threads keep them busy (4 is the default)"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoreConfig:
        return from_dict(cls, data)


def _shown(value) -> str:
    """``repr(value)``, but an int too long to print is named by its size."""
    if isinstance(value, int) and abs(value).bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    return repr(value)


@dataclass
class StoreStats:
    """Bytes per tier, hits and misses, link throughput and time spent waiting."""

    keys: int = 0
    gpu_bytes: int = 0
    pinned_bytes: int = 0
    nvme_bytes: int = 0
    hits: dict[str, int] = field(default_factory=lambda: {"gpu": 0, "cpu": 0})
    misses: dict[str, int] = field(default_factory=lambda: {"gpu": 0, "cpu": 0})
    disk_read_bytes: int = 0
    disk_read_s: float = 0.0
    disk_write_bytes: int = 0
    disk_write_s: float = 0.0
    h2d_bytes: int = 0
    stall_s: float = 0.0  # time get() waited for data that was not resident yet

    @property
    def disk_read_gbps(self) -> float:
        return self.disk_read_bytes / self.disk_read_s / 1e9 if self.disk_read_s else 0.0

    @property
    def disk_write_gbps(self) -> float:
        return self.disk_write_bytes / self.disk_write_s / 1e9 if self.disk_write_s else 0.0
