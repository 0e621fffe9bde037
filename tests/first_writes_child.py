"""Child of test_aio.py::test_first_writes_from_many_threads_do_not_deadlock: a fresh process
whose first DeepSpeed writes all start at once from eight lanes."""

import os
import sys
import threading

import torch

from infinity import AioConfig
from infinity.io import AioEngine

directory = sys.argv[1]
with AioEngine(AioConfig(lanes=8, intra_op_parallelism=1)) as engine:
    barrier = threading.Barrier(8)

    def write(i: int) -> None:
        tensor = torch.full((1 << 16,), i, dtype=torch.uint8)
        barrier.wait()
        engine.write(tensor, os.path.join(directory, f"f{i}.bin"), 0)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
print("ok")
