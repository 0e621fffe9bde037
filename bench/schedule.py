"""Benchmark: the prefetch planner and the online scheduler (no GPU or disk needed).

    python bench/schedule.py [--passes 2000] [--json out]

1. Predicted time against the bound for the issue's example (80 equal
   layers, 4 scans, pinned budget = half the layers, GPU budget = 3 layers) and for the
   Llama-70B-shaped 8-layer model of BENCHMARKS.md over a sweep of pinned budgets.
2. Write-back: an optimizer sweep (80 equal units, each read and written once per pass, pinned
   budget half of them, GPU three, 4 passes, then the flush) on the same disk; and with the
   bandwidths of NVMe arrays (disk 25 and 50 GB/s each way, PCIe 55 GB/s each way) the same
   sweep and inference scans (80 layers, GPU three, pinned 0, 1/4, 1/2 of the weights).
3. Throughput of the online Scheduler: events (steps + transfer completions) per second, driven
   from C++ (simulate) and from Python (one pybind call per event, as the store will drive it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import git_sha  # noqa: E402

from infinity.schedule import TRANSFERS, Bandwidths, Scheduler, plan, simulate  # noqa: E402

GB = 1e9
# BENCHMARKS.md: disk read 1.6 GB/s, pinned -> GPU 55 GB/s, 1.711 GB per layer, 8 layers,
# 0.0116 s of compute per forward with every layer resident.
BW = Bandwidths(disk_read=1.6e9, disk_write=2.3e9, h2d=55e9, d2h=40e9)
LAYER = 1_711_000_000
GIB = 1 << 30
# NVMe arrays: a few drives striped (25 GB/s) or many (50 GB/s), PCIe Gen5 x16 both ways.
NVME = {
    f"nvme {disk / GB:.0f} GB/s": Bandwidths(disk_read=disk, disk_write=disk, h2d=55e9, d2h=55e9)
    for disk in (25e9, 50e9)
}


def predicted(
    name, sizes, order, gpu_bytes, pinned_bytes, repeats, compute_s=None, bw=BW, writes=None
) -> dict:
    p = plan(
        sizes,
        order,
        gpu_bytes=gpu_bytes,
        pinned_bytes=pinned_bytes,
        bandwidths=bw,
        compute_s=compute_s,
        repeats=repeats,
        writes=writes,
    )
    r = simulate(p)
    row = {
        "case": name,
        "bandwidths": bw.__dict__,
        "gpu_bytes": gpu_bytes,
        "pinned_bytes": pinned_bytes,
        "repeats": repeats,
        "dirtied_per_pass": sum(1 for w in writes or () if w),
        "resident_gpu": len(p.resident_gpu),
        "resident_pinned": len(p.resident_pinned),
        "time_s": r.time_s,
        "bound_s": r.bound_s,
        "bound_over_time": r.bound_ratio,
        "disk_read_bytes": r.disk_read_bytes,
        "h2d_bytes": r.h2d_bytes,
        "disk_write_bytes": r.disk_write_bytes,
        "d2h_bytes": r.d2h_bytes,
        "peak_gpu_bytes": r.peak_gpu_bytes,
        "peak_pinned_bytes": r.peak_pinned_bytes,
    }
    print(
        f"{name:46} time {r.time_s:8.3f} s  bound {r.bound_s:8.3f} s  bound/time "
        f"{r.bound_ratio:5.3f}  disk {r.disk_read_bytes / GB:7.2f} GB  written "
        f"{r.disk_write_bytes / GB:7.2f} GB  peak GPU {r.peak_gpu_bytes / GB:5.2f} GB  pinned "
        f"{r.peak_pinned_bytes / GB:6.2f} GB",
        flush=True,
    )
    return row


def write_back_rows() -> list[dict]:
    n, sweep = 80, [True] * 80
    rows = [
        predicted(
            "optimizer sweep: 80 x 1 GiB, 4 passes", [GIB] * n, range(n), 3 * GIB, 40 * GIB, 4,
            writes=sweep,
        )
    ]  # fmt: skip
    for label, bw in NVME.items():
        for pinned in (0, n // 4, n // 2):
            rows.append(
                predicted(
                    f"{label}: scan 80 x 1 GiB, pinned {pinned}", [GIB] * n, range(n), 3 * GIB,
                    pinned * GIB, 4, bw=bw,
                )
            )  # fmt: skip
        rows.append(
            predicted(
                f"{label}: optimizer sweep, pinned 40", [GIB] * n, range(n), 3 * GIB, 40 * GIB, 4,
                bw=bw, writes=sweep,
            )
        )  # fmt: skip
    return rows


def python_driven_events_per_s(passes: int) -> tuple[float, int]:
    """Drive a Scheduler from Python the way an executor does: step, then complete in order."""
    n = 80
    p = plan([1 << 20] * n, range(n), gpu_bytes=3 << 20, pinned_bytes=40 << 20, repeats=1)
    sched = Scheduler(p)._s  # the raw binding: tuples, no NamedTuple per action
    inflight: list[int] = []
    events = 0
    start = time.perf_counter()
    inflight.extend(a[0] for a in sched.start() if a[1] in TRANSFERS)
    for t in range(n * passes):
        x = t % n
        inflight.extend(a[0] for a in sched.step(x) if a[1] in TRANSFERS)
        events += 1
        while not sched.on_gpu(x):
            done = inflight.pop(0)
            inflight.extend(a[0] for a in sched.done(done) if a[1] in TRANSFERS)
            events += 1
    return events / (time.perf_counter() - start), events


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--passes", type=int, default=2000, help="passes for the throughput runs")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = [
        predicted(
            "issue example: 80 x 1 GiB, 4 scans", [1 << 30] * 80, range(80), 3 << 30, 40 << 30, 4
        )
    ]
    compute = 0.0116 / 8
    for pinned_layers in (1, 2, 4, 6, 8):  # GPU budget: 3 layers; 3 passes, the first cold
        rows.append(
            predicted(
                f"70B-shaped 8 layers, pinned {pinned_layers}",
                [LAYER] * 8,
                range(8),
                3 * LAYER,
                pinned_layers * LAYER,
                3,
                compute,
            )
        )
    rows += write_back_rows()
    # throughput, C++-driven: one long simulate
    n = 80
    p = plan([1 << 20] * n, range(n), gpu_bytes=3 << 20, pinned_bytes=40 << 20, repeats=args.passes)
    start = time.perf_counter()
    r = simulate(p)
    cpp_s = time.perf_counter() - start
    steps = n * args.passes
    transfers = r.transfers
    cpp_rate = (steps + transfers) / cpp_s
    py_rate, py_events = python_driven_events_per_s(max(1, args.passes // 10))
    print(f"scheduler, C++-driven: {cpp_rate / 1e6:.2f} M events/s ({steps + transfers} events)")
    print(f"scheduler, Python-driven: {py_rate / 1e6:.2f} M events/s ({py_events} events)")
    out = {
        "benchmark": "schedule",
        "bandwidths": BW.__dict__,
        "predicted": rows,
        "throughput": {
            "cpp_events_per_s": cpp_rate,
            "cpp_events": steps + transfers,
            "python_events_per_s": py_rate,
            "python_events": py_events,
        },
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "git_sha": git_sha(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.date.today().isoformat(),
    }
    path = args.json or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"schedule-cpu-{out['date']}.json"
    )
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
