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

__all__ = [
    "AioConfig",
    "AioUnavailableError",
    "CapacityError",
    "ConfigError",
    "InfinityError",
    "IntegrityError",
    "StorageIOError",
    "format_size",
    "parse_size",
]
