"""Shared by the store tests (and the crash test's child process)."""

import torch

from infinity import AioConfig
from infinity.store import StoreConfig

SMALL_AIO = AioConfig(
    block_size_bytes=64 * 1024,
    queue_depth=8,
    intra_op_parallelism=2,
    bounce_buffer_bytes=256 * 1024,
    lanes=2,
)


def small_config(pinned_bytes=256 * 1024, **kw) -> StoreConfig:
    return StoreConfig(
        pinned_bytes=pinned_bytes, aio=SMALL_AIO, stripe_min_bytes=8192, io_threads=3, **kw
    )


def payload(key: str, version: int, nbytes: int) -> torch.Tensor:
    seed = (sum(key.encode()) * 1_000_003 + version) % (2**31)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
