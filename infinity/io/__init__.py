"""I/O engine: the only package that imports DeepSpeed's ops.

Other packages use the names below, never the private modules (``_transfer``, ``_deepspeed``).
"""

from infinity.io._deepspeed import (
    aio_config_defaults,
    deepspeed_version,
    load_aio,
    load_gds,
    quiet_deepspeed,
    set_build_progress,
)
from infinity.io._transfer import release_blocks
from infinity.io.aio import AioEngine, bounce_bytes
from infinity.io.copy import copy, copy_stream
from infinity.io.pinned import PinnedPool

__all__ = [
    "AioEngine",
    "PinnedPool",
    "aio_config_defaults",
    "bounce_bytes",
    "copy",
    "copy_stream",
    "deepspeed_version",
    "load_aio",
    "load_gds",
    "quiet_deepspeed",
    "release_blocks",
    "set_build_progress",
]
