"""Benchmark: TieredStore put/get/prefetch against the raw AioEngine on the same data, cold.

    python bench/store.py --dir /path/on/nvme [--tensors 16 --tensor-size 128MiB] [--json out]

Each store verb is timed against the engine making the same blocking calls on the same bytes:
put vs engine.write from the same CPU tensors (flush, i.e. fsync + manifest commit, timed apart),
pwrite of the existing keys (in place) vs engine.pwrite of the same pinned buffers over the same
blocks, all in flight,
prefetch(tier="cpu") vs engine.read into pinned memory, get(device="cpu") vs engine.read into a
new tensor, get(device="cuda") vs engine.read into a new GPU tensor. Page cache dropped before
every read pass (root), O_DIRECT throughout, store checksums on. Raw and store runs alternate
(ABBA); overhead = median over the pairs of store / raw - 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import git_sha  # noqa: E402

from infinity import AioConfig, format_size, parse_size  # noqa: E402
from infinity.info import collect  # noqa: E402
from infinity.io import AioEngine, PinnedPool  # noqa: E402
from infinity.iobench import drop_page_cache  # noqa: E402
from infinity.store import StoreConfig, TieredStore  # noqa: E402


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--tensors", type=int, default=16)
    ap.add_argument("--tensor-size", default="128MiB")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument(
        "--verbs",
        default="put,pwrite,prefetch,get-cpu,get-cuda",
        help="which to time (the data is written once either way)",
    )
    ap.add_argument("--json")
    args = ap.parse_args()
    n, size = args.tensors, parse_size(args.tensor_size)
    total = n * size
    aio = AioConfig(lanes=4)  # the store's default; the raw baseline gets the same
    root = os.path.join(args.dir, f"infinity-bench-store-{os.getpid()}")
    os.makedirs(root)
    raw_path = os.path.join(root, "raw.bin")
    gpu = torch.cuda.is_available()
    tensors = [torch.randint(0, 256, (size,), dtype=torch.uint8) for _ in range(n)]
    keys = [f"t{i}" for i in range(n)]
    results: dict[str, dict] = {}

    verbs = set(args.verbs.split(","))

    def record(name, raw_fn, store_fn, before=None):
        if not any(name.startswith(v.replace("-", " ")) for v in verbs):
            if name == "put":  # the data must exist for what follows: written, not timed
                raw_fn(), store_fn()
            return
        # Pairs run back to back, alternating which goes first (ABBA...), so that a drift of the
        # disk's speed hits both sides alike; the overhead is the median of the pairs' ratios.
        raw_s, store_s = [], []
        for rep in range(args.repeats):
            pair = ((raw_fn, raw_s), (store_fn, store_s))
            for fn, out in pair if rep % 2 == 0 else pair[::-1]:
                if before is not None:
                    before()
                out.append(timed(fn))
        ratios = sorted(s / r for r, s in zip(raw_s, store_s, strict=True))
        raw_med, store_med = statistics.median(raw_s), statistics.median(store_s)
        results[name] = {
            "raw_s": raw_s,
            "store_s": store_s,
            "raw_gbps": total / raw_med / 1e9,
            "store_gbps": total / store_med / 1e9,
            "overhead": statistics.median(ratios) - 1,
            "overhead_of_medians": store_med / raw_med - 1,
            "pair_ratio_quartiles": statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [],
        }
        r = results[name]
        print(
            f"{name:22} raw {r['raw_gbps']:6.2f} GB/s  store {r['store_gbps']:6.2f} GB/s  "
            f"overhead {r['overhead']:+.1%} (median of {len(ratios)} pairs; of medians "
            f"{r['overhead_of_medians']:+.1%})",
            flush=True,
        )

    cold = lambda: drop_page_cache(raw_path) if os.path.exists(raw_path) else None  # noqa: E731
    try:
        pool = PinnedPool(total)
        pinned = [pool.alloc(size) for _ in range(n)]
        cfg = StoreConfig(pinned_bytes=total + (64 << 20), gpu_bytes=0, aio=aio)
        with AioEngine(aio) as eng, TieredStore.open(os.path.join(root, "store"), cfg) as store:
            # The store's verbs block per key, so the raw baseline makes the same blocking
            # calls in the same order, on fresh blocks, allocating its outputs the same way.
            region = [0]

            def raw_write():  # fresh blocks each time, as the store's copy-on-write puts get
                for i, t in enumerate(tensors):
                    eng.write(t, raw_path, region[0] + i * size)
                region[0] += total

            def store_put():
                for k, t in zip(keys, tensors, strict=True):
                    store.put(k, t)

            def raw_read(make_dest):
                def run():
                    for i in range(n):
                        eng.read(make_dest(i), raw_path, i * size)

                return run

            def evict_all():
                cold()
                for k in keys:
                    store.evict(k, "cpu")

            record("put", raw_write, store_put)
            flush_s = timed(store.flush)
            print(f"flush (fsync + manifest commit) {flush_s * 1e3:.1f} ms", flush=True)
            for p, t in zip(pinned, tensors, strict=True):
                p.copy_(t)

            def raw_rewrite():  # the same blocks again, every request in flight at once
                futures = [eng.pwrite(p, raw_path, i * size) for i, p in enumerate(pinned)]
                for f in futures:
                    f.result()

            record("pwrite (in place)", raw_rewrite, lambda: store.pwrite(keys, pinned).result())
            record(
                "prefetch cpu (pinned)",
                raw_read(lambda i: pinned[i]),
                lambda: store.prefetch(keys, tier="cpu").result(),
                before=evict_all,
            )
            record(
                "get cpu (new tensor)",
                raw_read(lambda i: torch.empty(size, dtype=torch.uint8)),
                lambda: [store.get(k) for k in keys],
                before=evict_all,
            )
            if gpu:
                record(
                    "get cuda (new tensor)",
                    raw_read(lambda i: torch.empty(size, dtype=torch.uint8, device="cuda")),
                    lambda: [store.get(k, device="cuda") for k in keys],
                    before=evict_all,
                )
            stats = store.stats()
        for p in pinned:
            pool.free(p)
        pool.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = {
        "benchmark": "store",
        "tensors": n,
        "tensor_bytes": size,
        "total_bytes": total,
        "repeats": args.repeats,
        "aio": aio.to_dict(),
        "results": results,
        "flush_s": flush_s,
        "store_stats": {
            "disk_read_gbps": stats.disk_read_gbps,
            "disk_write_gbps": stats.disk_write_gbps,
        },
        "machine": collect(args.dir, check_aio=False),
        "git_sha": git_sha(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.date.today().isoformat(),
    }
    name = torch.cuda.get_device_name(0).replace(" ", "-") if gpu else "cpu"
    path = args.json or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"store-{name}-{out['date']}.json"
    )
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"{format_size(total)} in {n} tensors; wrote {path}")


if __name__ == "__main__":
    main()
