"""CUDA tensors through the engine's pipelined pinned bounce buffers (run on the GPU machine)."""

import os

import psutil
import pytest
import torch

from infinity import AioConfig
from infinity.io import AioEngine

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_engine():
    cfg = AioConfig(bounce_buffer_bytes=1 << 20, intra_op_parallelism=4, lanes=2)
    with AioEngine(cfg) as eng:
        yield eng


@pytest.mark.parametrize("nbytes", [1, 4095, 4097, (1 << 20) + 1, (5 << 20) + 12345])
@pytest.mark.parametrize("offset", [0, 1, 4097])
def test_gpu_roundtrip(gpu_engine, disk_dir, nbytes, offset):
    path = os.path.join(disk_dir, "g.bin")
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    gpu_engine.write(src, path, offset)
    out = torch.full((nbytes,), 7, dtype=torch.uint8, device="cuda")
    gpu_engine.read(out, path, offset)
    assert torch.equal(out, src)
    cpu = torch.empty(nbytes, dtype=torch.uint8)
    gpu_engine.read(cpu, path, offset)  # the same bytes land on the CPU path
    assert torch.equal(cpu, src.cpu())


def test_gpu_write_waits_for_the_producing_kernel(gpu_engine, disk_dir):
    """The tensor is produced on the caller's stream just before pwrite: the engine must wait."""
    path = os.path.join(disk_dir, "k.bin")
    a = torch.randn(4096, 4096, device="cuda")
    src = a @ a  # still running when pwrite is called
    fut = gpu_engine.pwrite(src, path, 0)
    fut.result()
    out = torch.empty_like(src)
    gpu_engine.read(out, path, 0)
    assert torch.equal(out, src)


def test_gpu_bf16_and_fp8(gpu_engine, disk_dir):
    path = os.path.join(disk_dir, "d.bin")
    for i, dtype in enumerate([torch.bfloat16, torch.float8_e4m3fn]):
        src = torch.randn(333, 77, device="cuda").to(dtype)
        gpu_engine.write(src, path, 1000 * i)
        out = torch.empty_like(src)
        gpu_engine.read(out, path, 1000 * i)
        assert torch.equal(out.view(torch.uint8), src.view(torch.uint8))


def test_gpu_pinned_pool_is_torch_pinned():
    from infinity.io import PinnedPool

    with PinnedPool(1 << 20) as pool:
        assert pool.kind == "cuda"
        view = pool.alloc(12345)
        assert view.is_pinned() and view.data_ptr() % 4096 == 0
        pool.free(view)


def test_gpu_pinned_pool_pins_exactly_its_size_and_unpins_on_close(gpu_engine, disk_dir):
    """Registered, not torch's power-of-two caching allocator: the region is the pool's own and
    goes back at close (unregistering it again then fails)."""
    from infinity.io import PinnedPool
    from infinity.io.pinned import clear_cuda_error

    cudart = torch.cuda.cudart()
    rss = psutil.Process().memory_info().rss
    pool = PinnedPool((256 << 20) + 4096)
    assert psutil.Process().memory_info().rss - rss > (250 << 20)  # pinned means resident
    ptr = pool._buffer.untyped_storage().data_ptr()
    first = pool.alloc(4096)  # the next view starts inside the storage, not at its first byte
    view = pool.alloc(3 << 20)
    assert view.is_pinned()  # else DeepSpeed's aio would bounce every transfer
    view.copy_(torch.randint(0, 256, (3 << 20,), dtype=torch.uint8))
    path = os.path.join(disk_dir, "p.bin")
    gpu_engine.write(view, path, 0)  # O_DIRECT straight from the registered region
    on_gpu = view.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), view)
    pool.free(view)
    pool.free(first)
    del view, first  # views keep the storage alive
    pool.close()
    assert cudart.cudaHostUnregister(ptr) != cudart.cudaError.success  # already unregistered
    clear_cuda_error()  # else torch's next launch check raises the failed call's error
    assert torch.ones(4, device="cuda").sum().item() == 4
    assert psutil.Process().memory_info().rss - rss < (64 << 20)  # exact size, not cached
