"""infinity: tiered tensor storage (GPU / pinned CPU / NVMe) on DeepSpeed's async I/O.

``import infinity`` is cheap: it loads the small C++ core and the configuration classes, never
compiles anything and never initialises CUDA. The I/O engine lives in ``infinity.io``.
"""

from infinity import _core  # noqa: F401  (fails early, with the fix, if infinity._C is stale)
from infinity.config import AioConfig, format_size, parse_size
from infinity.errors import (
    AioUnavailableError,
    CapacityError,
    ConfigError,
    InfinityError,
    IntegrityError,
    StorageIOError,
)

__version__ = "0.1.0"

_LAZY = {"TieredStore": "infinity.store", "StoreConfig": "infinity.store"}


def __getattr__(name: str):
    """TieredStore and StoreConfig load torch: import them on first use, not with infinity."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'infinity' has no attribute {name!r}")


__all__ = [
    "AioConfig",
    "AioUnavailableError",
    "CapacityError",
    "ConfigError",
    "InfinityError",
    "IntegrityError",
    "StorageIOError",
    "StoreConfig",
    "TieredStore",
    "format_size",
    "parse_size",
]
