"""`infinity bench io`: what the disk, PCIe and aio settings can do, with references measured in
the same run (DeepSpeed with its config defaults, DeepSpeed's own GPU path, a plain buffered read,
dd).

Every point is timed ``repeats`` times (3 by default): the median is reported with the spread
(slowest and fastest run), and "best" is chosen by median, so that one lucky run does not pick
the settings.

Cold reads: each read is preceded by a page-cache drop (``drop_page_cache``:
``/proc/sys/vm/drop_caches`` when root, else ``posix_fadvise(DONTNEED)`` on the file); the aio
paths use O_DIRECT regardless. Writes are O_DIRECT into preallocated blocks, timed without fsync
(as DeepSpeed's ds_io does).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from infinity.config import AioConfig, format_size
from infinity.errors import ConfigError
from infinity.io import AioEngine, PinnedPool, aio_config_defaults, load_aio
from infinity.io.fsinfo import MEMORY_FS, FsInfo, fs_info
from infinity.io.pinned import pinnable_bytes

GRIDS = {  # block sizes, queue depths, intra-op parallelism, single_submit
    "quick": ([1 << 20, 8 << 20], [32], [8], [False]),
    "default": ([1 << 20, 8 << 20], [32, 128], [4, 8], [False, True]),
    "full": (
        [256 << 10, 1 << 20, 4 << 20, 8 << 20, 16 << 20],
        [8, 32, 128],
        [1, 2, 4, 8],
        [False, True],
    ),
}
DEFAULT_REPEATS = 3
TABLE_COLUMNS = ("op", "into", "system", "settings", "GB/s", "min-max", "x best read")


@dataclass
class Result:
    op: str  # read | write
    target: str  # pinned | gpu | pageable
    system: str  # infinity | deepspeed-config-defaults | deepspeed-gpu | buffered-read | dd-direct
    config: dict[str, Any]
    nbytes: int
    seconds: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def gbps(self) -> float:
        return self.nbytes / self.median_s / 1e9

    def to_dict(self, best_read_gbps: float) -> dict[str, Any]:
        """``gbps`` is the median's; ``min_gbps``/``max_gbps`` the slowest and fastest run's."""
        out = asdict(self)
        out.update(
            median_s=self.median_s,
            gbps=self.gbps,
            min_gbps=self.nbytes / max(self.seconds) / 1e9,
            max_gbps=self.nbytes / min(self.seconds) / 1e9,
            ratio_to_best_read=self.gbps / best_read_gbps,
        )
        return out


def drop_page_cache(paths: Iterable[str | os.PathLike]) -> str:
    """Empty the page cache of ``paths`` (files, or directories: every file under them) before a
    cold read; returns how: "drop_caches" (root: the whole page cache, through
    /proc/sys/vm/drop_caches) or "fadvise" (``POSIX_FADV_DONTNEED`` on each file, which needs no
    privilege). Dirty pages are written back first (``os.sync``): neither drops them.
    The one helper for this; bench/ uses it too."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        pass
    for top in paths:
        walked = os.walk(top) if os.path.isdir(top) else [("", [], [os.fspath(top)])]
        for root, _, files in walked:
            for name in files:
                with contextlib.suppress(OSError):  # gone meanwhile, or not ours to read
                    fd = os.open(os.path.join(root, name), os.O_RDONLY)
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)
    return "fadvise"


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _buffered_read(path: str, nbytes: int) -> None:
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        left = nbytes
        while left > 0:
            got = f.readinto(view[: min(len(buf), left)])
            if not got:
                raise OSError(f"buffered read of {path} ended {left} bytes early")
            left -= got


def _dd_direct(path: str, nbytes: int) -> None:
    count = nbytes // (16 << 20)
    subprocess.run(
        ["dd", f"if={path}", "of=/dev/null", "bs=16M", f"count={count}", "iflag=direct"],
        check=True,
        capture_output=True,
    )


def check_output_path(path: str) -> None:
    """ConfigError unless a file can be written at ``path``: checked before a long run, so that
    a typo in the output path does not throw away its results."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"output {path} is a directory; give the path of a file to write")
    if not os.path.isdir(parent):
        raise ConfigError(
            f"output {path}: directory {parent} does not exist; create it or use another path"
        )
    if not os.access(path if os.path.exists(path) else parent, os.W_OK):
        raise ConfigError(f"output {path}: not writable by this user; use another path")


def _check(
    directory: str, size_bytes: int, gpu: bool, grid: str, repeats: int, output_path: str | None
) -> tuple[FsInfo, int]:
    """Every argument checked before any work: (the directory's filesystem, the transfer size)."""
    if grid not in GRIDS:
        raise ConfigError(f"unknown grid {grid!r}; use one of {sorted(GRIDS)}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"--repeats must be a whole number >= 1, got {repeats!r}")
    if output_path is not None:
        check_output_path(output_path)
    fs = fs_info(directory)
    if fs.fs_type in MEMORY_FS or not fs.direct_io:
        raise ConfigError(
            f"{directory} is on {fs.fs_type} ({fs.direct_io_error or 'memory, not a disk'}); "
            "benchmark a directory on the drive you will offload to"
        )
    if gpu and not torch.cuda.is_available():
        raise ConfigError("--gpu asked, but torch sees no CUDA device")
    unit = 4096 * max(GRIDS[grid][2]) * 16
    size = max(unit, size_bytes // unit * unit)
    if fs.free_bytes < size + (256 << 20):
        raise ConfigError(
            f"benchmark file needs {format_size(size)}; {format_size(fs.free_bytes)} free in "
            f"{directory}: lower --size"
        )
    # a pinned buffer of `size`, its pageable copy, and one engine's bounce buffers at a time
    bounce = 2 * max(AioConfig(intra_op_parallelism=p).bounce_chunk_bytes for p in GRIDS[grid][2])
    allowed, where = pinnable_bytes()
    if 2 * size + bounce > allowed:
        raise ConfigError(
            f"--size {format_size(size)} needs {format_size(2 * size + bounce)} of host memory "
            f"(a pinned buffer, a pageable copy of it, {format_size(bounce)} of bounce buffers); "
            f"{where}, of which a pool may take {format_size(allowed)}: lower --size to at most "
            f"{format_size(max(0, allowed - bounce) // 2)}"
        )
    if gpu and size > torch.cuda.mem_get_info()[0]:
        raise ConfigError(
            f"--size {format_size(size)} does not fit in the GPU's free memory "
            f"({format_size(torch.cuda.mem_get_info()[0])}); lower --size"
        )
    return fs, size


def run(
    directory: str,
    size_bytes: int,
    gpu: bool = False,
    grid: str = "default",
    repeats: int = DEFAULT_REPEATS,
    progress: Callable[[str], None] | None = None,
    output_path: str | None = None,
) -> dict[str, Any]:
    """Run the sweep and the references; returns a JSON-ready dict. ``output_path``, where the
    caller will write it, is checked up front (the run writes nothing there)."""
    fs, size = _check(directory, size_bytes, gpu, grid, repeats, output_path)
    blocks, depths, pars, submits = GRIDS[grid]
    note = progress or (lambda _msg: None)
    path = os.path.join(directory, f"infinity-bench-{os.getpid()}.bin")
    results: list[Result] = []
    cache_drop_global = False
    configs = [
        AioConfig(
            block_size_bytes=b,
            queue_depth=q,
            intra_op_parallelism=p,
            single_submit=s,
            overlap_events=True,
            lanes=1,
        )
        for b, q, p, s in itertools.product(blocks, depths, pars, submits)
    ]
    pool = PinnedPool(size)
    buf = pool.alloc(size)
    gpu_buf = torch.empty(size, dtype=torch.uint8, device="cuda") if gpu else None
    try:
        gen = torch.Generator().manual_seed(0)
        for start in range(0, size, 64 << 20):
            chunk = buf[start : start + (64 << 20)]
            chunk.copy_(torch.randint(0, 256, (chunk.numel(),), dtype=torch.uint8, generator=gen))
        reference_sum = buf.view(torch.int64).sum().item()

        def measure(op, target, system, cfg, fn, verify=None):
            res = Result(op, target, system, cfg, size)
            for _ in range(repeats):
                if op == "read":
                    nonlocal cache_drop_global
                    cache_drop_global |= drop_page_cache([path]) == "drop_caches"
                res.seconds.append(_timed(fn))
                if verify is not None:
                    verify()
            results.append(res)
            note(f"{op:5} {target:8} {system:25} {short_summary(cfg):34} {res.gbps:6.2f} GB/s")
            return res

        def check_pinned():
            if buf.view(torch.int64).sum().item() != reference_sum:
                raise RuntimeError("benchmark read returned wrong bytes")
            buf.zero_()

        def check_gpu():
            if gpu_buf.view(torch.int64).sum().item() != reference_sum:
                raise RuntimeError("benchmark GPU read returned wrong bytes")
            gpu_buf.zero_()

        source = buf.clone()  # pageable copy, to restore the pinned buffer between reads
        for cfg in configs:
            with AioEngine(cfg) as eng:
                measure(
                    "write",
                    "pinned",
                    "infinity",
                    cfg.deepspeed_section(),
                    lambda: eng.write(buf, path, 0),
                )
                measure(
                    "read",
                    "pinned",
                    "infinity",
                    cfg.deepspeed_section(),
                    lambda: eng.read(buf, path, 0),
                    check_pinned,
                )
                if gpu:
                    measure(
                        "read",
                        "gpu",
                        "infinity",
                        cfg.deepspeed_section(),
                        lambda: eng.read(gpu_buf, path, 0),
                        check_gpu,
                    )
            buf.copy_(source)

        aio = load_aio()
        # what a DeepSpeed config without an `aio` section gets (queue depth 8, one thread), not
        # the aio handle's constructor defaults (queue depth 128), which no config reaches
        ds_cfg = aio_config_defaults()
        handle = _handle(aio, ds_cfg)
        measure(
            "read",
            "pinned",
            "deepspeed-config-defaults",
            ds_cfg,
            lambda: _check_rc(handle.sync_pread(buf, path, 0)),
            check_pinned,
        )
        if gpu:
            measure(
                "read",
                "gpu",
                "deepspeed-config-defaults",
                ds_cfg,
                lambda: _check_rc(handle.sync_pread(gpu_buf, path, 0)),
                check_gpu,
            )
        best = max(
            (r for r in results if r.op == "read" and r.target == "pinned"), key=lambda r: r.gbps
        )
        if gpu:  # DeepSpeed's own GPU path (its internal bounce), with the best settings
            ds_best = _handle(aio, best.config)
            measure(
                "read",
                "gpu",
                "deepspeed-gpu",
                best.config,
                lambda: _check_rc(ds_best.sync_pread(gpu_buf, path, 0)),
                check_gpu,
            )
        measure(
            "read",
            "pageable",
            "buffered-read",
            {"chunk_bytes": 16 << 20},
            lambda: _buffered_read(path, size),
        )
        if shutil.which("dd"):
            measure(
                "read",
                "pageable",
                "dd-direct",
                {"bs": "16M", "iflag": "direct"},
                lambda: _dd_direct(path, size),
            )
    finally:
        if os.path.exists(path):
            os.unlink(path)
        pool.free(buf)
        pool.close()
    return _summary(results, size, grid, repeats, fs, cache_drop_global, gpu)


def _summary(
    results: list[Result],
    size: int,
    grid: str,
    repeats: int,
    fs: FsInfo,
    cache_drop_global: bool,
    gpu: bool,
) -> dict[str, Any]:
    """The JSON-ready result of a run; every "best" is the best median."""
    raw_reads = [r for r in results if r.op == "read" and r.target == "pinned"]
    best_read = max(raw_reads, key=lambda r: r.gbps)
    writes = [r for r in results if r.op == "write"]
    best_write = max(writes, key=lambda r: r.gbps)
    best_any = max(
        (r for r in results if r.op == "read" and r.target != "gpu"), key=lambda r: r.gbps
    )
    summary: dict[str, Any] = {
        "size_bytes": size,
        "grid": grid,
        "repeats": repeats,
        "directory": fs.to_dict(),
        "cold": {
            "o_direct": True,
            "drop_caches": cache_drop_global,
            "fadvise_dontneed": not cache_drop_global,
        },
        "results": [r.to_dict(best_read.gbps) for r in results],
        "best_read": best_read.to_dict(best_read.gbps),
        "best_write": best_write.to_dict(best_read.gbps),
        "best_read_any_tool": best_any.to_dict(best_read.gbps),
        "best_read_over_best_any_tool": best_read.gbps / best_any.gbps,
        "deepspeed_aio_section": best_read.config,
    }
    if gpu:
        ours = [r for r in results if r.target == "gpu" and r.system == "infinity"]
        best_gpu = max(ours, key=lambda r: r.gbps)
        summary["best_gpu_read"] = best_gpu.to_dict(best_read.gbps)
        summary["gpu_over_pinned"] = best_gpu.gbps / best_read.gbps
    return summary


def _handle(aio: Any, section: dict[str, Any]) -> Any:
    """DeepSpeed's aio handle for an ``aio`` config section, as DeepSpeed itself builds it."""
    return aio.aio_handle(
        section["block_size"],
        section["queue_depth"],
        section["single_submit"],
        section["overlap_events"],
        section["intra_op_parallelism"],
    )


def _check_rc(rc: int) -> None:
    if rc < 0:
        raise RuntimeError(f"DeepSpeed aio returned {rc}")


def _compact(nbytes: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return str(nbytes)


def short_summary(cfg: dict[str, Any]) -> str:
    """One result's settings in a table cell: ``bs=8M qd=32 p=8 ss=0``."""
    if "block_size" in cfg:
        return (
            f"bs={_compact(cfg['block_size'])} qd={cfg['queue_depth']} "
            f"p={cfg['intra_op_parallelism']} ss={int(cfg['single_submit'])}"
        )
    return " ".join(f"{k}={_compact(v) if isinstance(v, int) else v}" for k, v in cfg.items())


def table_rows(data: dict[str, Any]) -> list[tuple[str, ...]]:
    """The rows under ``TABLE_COLUMNS`` for the results of ``run``: median GB/s, the slowest and
    fastest run, and the median over the best read's median."""
    return [
        (
            r["op"],
            r["target"],
            r["system"],
            short_summary(r["config"]),
            f"{r['gbps']:.2f}",
            f"{r['min_gbps']:.2f}-{r['max_gbps']:.2f}",
            f"{r['ratio_to_best_read']:.2f}",
        )
        for r in data["results"]
    ]


def plain_table(data: dict[str, Any]) -> str:
    """The table as plain aligned columns, as wide as its cells (never cut, for pipes and logs)."""
    rows = [TABLE_COLUMNS, *table_rows(data)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    right = {"GB/s", "min-max", "x best read"}
    return "\n".join(
        "  ".join(
            cell.rjust(w) if col in right else cell.ljust(w)
            for col, cell, w in zip(TABLE_COLUMNS, row, widths, strict=True)
        ).rstrip()
        for row in rows
    )
