"""The GPU tier (run on the GPU machine)."""

import os

import pytest
import torch
from store_helpers import small_config

from infinity import CapacityError
from infinity.store import TieredStore

pytestmark = pytest.mark.gpu


def test_gpu_put_get_prefetch_evict(disk_dir):
    store_dir = os.path.join(disk_dir, "store")
    cfg = small_config(pinned_bytes=1 << 20, gpu_bytes=3 * 400_000)
    with TieredStore.open(store_dir, cfg) as s:
        tensors = {
            f"k{i}": torch.randn(100_000, device="cuda").to(torch.bfloat16) for i in range(4)
        }
        for k, t in tensors.items():
            s.put(k, t, tier="gpu")
        assert s.stats().gpu_bytes <= cfg.gpu_bytes  # the 4th put dropped one GPU copy
        for k, t in tensors.items():
            got = s.get(k, device="cuda")
            assert got.is_cuda and torch.equal(got, t)
            assert torch.equal(s.get(k, device="cpu"), t.cpu())
        s.evict("k0", tier="gpu")
        assert "gpu" not in s.entry("k0").tiers
        assert s.prefetch(["k0"], tier="gpu").result() == 1
        assert "gpu" in s.entry("k0").tiers
        with pytest.raises(CapacityError, match="exceeds the whole gpu tier"):
            s.put("big", torch.ones(2_000_000, device="cuda"), tier="gpu")
    with TieredStore.open(store_dir, cfg) as s:  # NVMe held everything
        for k, t in tensors.items():
            assert torch.equal(s.get(k, device="cuda:0"), t)


def test_gpu_get_orders_against_the_callers_stream(disk_dir):
    """get(cuda) copies on the store's stream; the caller's stream must see finished data."""
    store_dir = os.path.join(disk_dir, "store")
    with TieredStore.open(store_dir, small_config(pinned_bytes=64 << 20)) as s:
        t = torch.randn(4096, 4096)
        s.put("w", t)
        a = torch.randn(4096, 4096, device="cuda")
        _ = a @ a  # keep the default stream busy
        got = s.get("w", device="cuda")
        assert torch.equal((got * 1).cpu(), t)
