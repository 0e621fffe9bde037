"""Measurement helpers of bench/forward.py: cold passes, bytes read, the machine's limits
(disk read, pinned -> GPU), decode timing, and running a child process inside a memory cgroup."""

from __future__ import annotations

import json
import mmap
import os
import shutil
import socket
import statistics
import time

import torch

from infinity import parse_size  # noqa: F401 - the one size parser ("4G" is 4e9, "4GiB" 2**32)
from infinity.iobench import drop_page_cache

GIB = 1 << 30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gpu(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def read_bytes() -> int | None:
    """Bytes this process (all its threads) made the block layer read: O_DIRECT, aio, page
    faults of mmaps and readahead alike; None where /proc/self/io is missing."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_pass(fn, device: torch.device, cold_paths: list[str] | None) -> dict:
    """One timed call of ``fn``: seconds, peak GPU memory, bytes read, how it was made cold."""
    how = drop_page_cache(cold_paths) if cold_paths is not None else "warm"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = read_bytes()
    start = time.perf_counter()
    fn()
    sync(device)
    seconds = time.perf_counter() - start
    after = read_bytes()
    return {
        "s": seconds,
        "peak_gpu_bytes": peak_gpu(device),
        "bytes_read": None if before is None or after is None else after - before,
        "cache": how,
    }


def decode(model, vocab: int, batch: int, prompt: int, new_tokens: int, device) -> dict:
    """``generate`` of ``new_tokens`` greedy tokens after a ``prompt``-token prompt; the time of
    each step comes from a logits processor (called once per forward, after a device sync)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            sync(device)
            stamps.append(time.perf_counter())
            return scores

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, prompt), generator=gen).to(device)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            logits_processor=LogitsProcessorList([Stamp()]),
        )
    sync(device)
    total = time.perf_counter() - start
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    per_token = statistics.median(steps) if steps else None
    return {
        "kind": "decode",
        "batch": batch,
        "prompt_tokens": prompt,
        "new_tokens": int(out.shape[1] - prompt),
        "total_s": total,
        "prefill_s": stamps[0] - start if stamps else None,
        "step_s": steps,
        "s": per_token,
        "tokens_per_s": batch / per_token if per_token else None,
        "peak_gpu_bytes": peak_gpu(device),
    }


def disk_read_gbps(files: list[str], limit: int, cold_paths: list[str]) -> dict:
    """Cold O_DIRECT read of up to ``limit`` bytes of ``files`` with infinity's AioEngine
    (DeepSpeed aio) in two shapes, keeping the faster: 2 requests of 256 MiB in flight on one
    lane, and 8 of 64 MiB over 4 lanes (the store's shape); plain O_DIRECT preads if the engine
    does not load. The bound must be the best the raw engine does, or ratios exceed 1."""
    runs, errors = [], []
    for piece, inflight, lanes in ((256 << 20, 2, None), (64 << 20, 8, 4)):
        try:
            runs.append(_probe(files, limit, cold_paths, piece, inflight, lanes))
        except Exception as exc:  # noqa: BLE001 - any failure: fall back, say why
            errors.append(repr(exc)[:200])
    if not runs:
        cache = drop_page_cache(cold_paths)
        plan = _pieces(files, limit, 16 << 20)
        seconds = _direct_read(plan)
        total = sum(n for _, _, n in plan)
        method = f"Python O_DIRECT preads of 16 MiB (AioEngine unavailable: {errors[0]})"
        runs.append({"gbps": total / seconds / 1e9, "bytes": total, "s": seconds,
                     "cache": cache, "method": method})  # fmt: skip
    best = max(runs, key=lambda r: r["gbps"])
    return {**best, "probes": runs}


def read_files(files: list[str], cold_paths: list[str]) -> dict:
    """Cold O_DIRECT read of the whole of ``files`` with the raw AioEngine in the store's shape
    (64 MiB pieces, 8 in flight over 4 lanes): the disk's speed on exactly these bytes, now."""
    size = sum(os.path.getsize(f) for f in files)
    return _probe(files, size, cold_paths, 64 << 20, 8, 4)


def _probe(files, limit: int, cold_paths, piece: int, inflight: int, lanes) -> dict:
    cache = drop_page_cache(cold_paths)
    seconds, total = _aio_read(files, limit, piece, inflight, lanes)
    lane_text = f", {lanes} lanes" if lanes else ""
    return {
        "gbps": total / seconds / 1e9, "bytes": total, "s": seconds, "cache": cache,
        "method": f"infinity AioEngine (DeepSpeed aio, O_DIRECT), {inflight} x "
                  f"{piece >> 20} MiB in flight{lane_text}",
    }  # fmt: skip


def io_summary(timeline, nbytes: list[int], t0: float, t1: float) -> dict:
    """What the disk did between ``t0`` and ``t1`` from an executor's timeline of
    (time, event, unit): how long a read was in flight (the union of the reads' intervals,
    clipped to the window), the speed of the reads that finished inside it while any of them
    was in flight, and how the pass began and ended."""
    started, finished, spans = {}, [], []
    for t, event, unit in timeline:
        if event == "read":
            started[unit] = t
        elif event == "read done" and unit in started:
            a = started.pop(unit)
            if t >= t0 and a <= t1:
                spans.append((max(a, t0), min(t, t1)))
                if t <= t1:
                    finished.append((max(a, t0), t, nbytes[unit]))
    spans += [(max(a, t0), t1) for a in started.values() if a <= t1]  # still in flight
    busy = _union(spans)
    done_busy = _union([(a, b) for a, b, _ in finished])
    done = sum(n for _, _, n in finished)
    return {
        "pass_s": t1 - t0,
        "disk_busy_s": busy,
        "disk_busy_fraction": busy / (t1 - t0) if t1 > t0 else None,
        "reads_done": len(finished),
        "reads_done_bytes": done,
        "read_gbps_while_busy": done / done_busy / 1e9 if done_busy else None,
        "first_read_after_s": min(a for a, _ in spans) - t0 if spans else None,
        "tail_after_last_read_s": t1 - max(t for _, t, _ in finished) if finished else None,
    }


def _union(spans) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        total += max(0.0, b - max(a, end))
        end = max(end, b)
    return total


def _pieces(files: list[str], limit: int, piece: int) -> list[tuple[str, int, int]]:
    plan, total = [], 0
    for path in files:
        size = os.path.getsize(path)
        for off in range(0, size, piece):
            n = min(piece, size - off, limit - total)
            if n <= 0:
                break
            plan.append((path, off, n))
            total += n
    return plan


def _aio_read(files, limit: int, piece: int, inflight: int, lanes) -> tuple[float, int]:
    from infinity import AioConfig
    from infinity.io import AioEngine, PinnedPool

    plan = _pieces(files, limit, piece)
    pool = PinnedPool(inflight * piece)
    bufs = [pool.alloc(piece) for _ in range(inflight)]
    cfg = AioConfig(lanes=lanes) if lanes else AioConfig()
    try:
        with AioEngine(cfg) as eng:
            start = time.perf_counter()
            pending = []
            for k, (path, off, n) in enumerate(plan):
                if len(pending) == inflight:
                    pending.pop(0).result()
                pending.append(eng.pread(bufs[k % inflight][:n], path, off))
            for fut in pending:
                fut.result()
            seconds = time.perf_counter() - start
    finally:
        for b in bufs:
            pool.free(b)
        pool.close()
    return seconds, sum(n for _, _, n in plan)


def _direct_read(plan) -> float:
    buf = mmap.mmap(-1, 16 << 20)  # page-aligned, as O_DIRECT needs
    start = time.perf_counter()
    for path, off, n in plan:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        try:
            done = 0
            while done < n:
                got = os.preadv(fd, [buf], off + done)
                if got <= 0:
                    break
                done += got
        finally:
            os.close(fd)
    return time.perf_counter() - start


def h2d_gbps(device: torch.device, nbytes: int = GIB, repeats: int = 5) -> dict | None:
    """Pinned host -> GPU copy of one ``nbytes`` tensor: best and median of ``repeats``."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    del src, dst
    torch.cuda.empty_cache()
    return {
        "gbps": nbytes / min(times) / 1e9,
        "median_gbps": nbytes / statistics.median(times) / 1e9,
        "bytes": nbytes,
        "s": times,
    }


class Cgroup:
    """A memory cgroup (v2 ``memory.max``, else v1 ``memory.limit_in_bytes``) for one child.

    ``wrap(cmd)`` returns a command that moves itself into the cgroup and then execs ``cmd``, so
    the child is capped from its first allocation; the cap covers its page cache too."""

    def __init__(self, name: str, limit: int):
        self.limit = limit
        if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            self.version, self.path = 2, f"/sys/fs/cgroup/{name}"
            ctl = "/sys/fs/cgroup/cgroup.subtree_control"
            with open(ctl) as f:
                enabled = f.read().split()
            if "memory" not in enabled:
                with open(ctl, "w") as f:  # may fail (EBUSY) where processes sit at the root
                    f.write("+memory")
            os.makedirs(self.path, exist_ok=True)
            self._write("memory.max", str(limit))
            if os.path.exists(os.path.join(self.path, "memory.swap.max")):
                self._write("memory.swap.max", "0")
        elif os.path.isdir("/sys/fs/cgroup/memory"):
            self.version, self.path = 1, f"/sys/fs/cgroup/memory/{name}"
            os.makedirs(self.path, exist_ok=True)
            self._write("memory.limit_in_bytes", str(limit))
        else:
            raise OSError("no cgroup memory controller at /sys/fs/cgroup")

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def _read(self, name: str) -> str | None:
        try:
            with open(os.path.join(self.path, name)) as f:
                return f.read().strip()
        except OSError:
            return None

    def wrap(self, cmd: list[str]) -> list[str]:
        script = 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"'
        return ["sh", "-c", script, "sh", self.path, *cmd]

    def stats(self) -> dict:
        if self.version == 2:
            peak, events = self._read("memory.peak"), self._read("memory.events")
            ev = dict(line.split() for line in events.splitlines()) if events else {}
            return {
                "version": 2,
                "path": self.path,
                "limit_bytes": self.limit,
                "peak_bytes": int(peak) if peak else None,
                "events": ev,
            }
        peak = self._read("memory.max_usage_in_bytes")
        return {
            "version": 1,
            "path": self.path,
            "limit_bytes": self.limit,
            "peak_bytes": int(peak) if peak else None,
            "failcnt": self._read("memory.failcnt"),
        }

    def remove(self) -> None:
        for _ in range(50):  # the kernel frees a cgroup a moment after its last process exits
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


def write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
