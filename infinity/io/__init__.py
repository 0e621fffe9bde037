"""I/O engine: the only package that imports DeepSpeed's ops."""

from infinity.io.aio import AioEngine
from infinity.io.pinned import PinnedPool

__all__ = ["AioEngine", "PinnedPool"]
