"""Benchmark: the I/O sweep of `infinity bench io`, with GPU reads when a GPU is present, saved
under bench/results/ with the machine, git SHA and command.

    python bench/io.py --dir /path/on/nvme --size 4GiB [--grid default] [--repeats 3]
                       [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ROOT, git_sha  # noqa: E402

from infinity import iobench, parse_size  # noqa: E402
from infinity.info import collect  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--size", default="4GiB")
    ap.add_argument("--grid", choices=sorted(iobench.GRIDS), default="default")
    ap.add_argument("--quick", action="store_true", help="same as --grid quick")
    ap.add_argument("--repeats", type=int, default=iobench.DEFAULT_REPEATS)
    ap.add_argument("--json", help="output path (default bench/results/io-<gpu>-<date>.json)")
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    date = datetime.date.today().isoformat()
    name = torch.cuda.get_device_name(0).replace(" ", "-") if gpu else "cpu"
    out = args.json or os.path.join(ROOT, "bench", "results", f"io-{name}-{date}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    data = iobench.run(
        args.dir,
        parse_size(args.size),
        gpu=gpu,
        grid="quick" if args.quick else args.grid,
        repeats=args.repeats,
        progress=lambda msg: print(msg, flush=True),
        output_path=out,
    )
    data["machine"] = collect(args.dir, check_aio=False)
    data["git_sha"] = git_sha()
    data["command"] = " ".join([os.path.basename(sys.executable), *sys.argv])
    data["date"] = date
    with open(out, "w") as f:
        json.dump(data, f, indent=2)
    best = data["best_read"]
    print(iobench.plain_table(data))
    print(
        f"best read (median of {data['repeats']}) {best['gbps']:.2f} GB/s "
        f"[{best['min_gbps']:.2f}-{best['max_gbps']:.2f}] with "
        f"{iobench.short_summary(best['config'])}"
    )
    if gpu:
        ds = [r for r in data["results"] if r["system"] == "deepspeed-gpu"]
        print(
            f"GPU read (ours) {data['best_gpu_read']['gbps']:.2f} GB/s = "
            f"{data['gpu_over_pinned']:.1%} of pinned; DeepSpeed's GPU path "
            f"{ds[0]['gbps']:.2f} GB/s = {ds[0]['ratio_to_best_read']:.1%}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
