"""Benchmark (issue 14): the optimizer step of a ~1B Llama-shaped model with AdamW's fp32 states
on NVMe, ours (``OffloadedAdamW``) against DeepSpeed ZeRO-3 ``offload_optimizer: nvme``
(non-pipelined, and pipelined at a buffer count that does not crash), judged against the I/O
bound ``N * (12 / BW_read + 12 / BW_write)`` with both bandwidths measured in the same run.

    python bench/train.py --dir .t/train --json $OUT/train.json        # 0.95B model, all systems
    python bench/train.py --tiny --systems bounds,ours --curve ""       # CI, CPU ok
    python bench/train.py ... --cgroup-mem 16GiB    # each system under a memory.max (root)

Systems (``--systems``, in that order): bounds (disk write then cold read of a scratch file with
the raw AioEngine, O_DIRECT), ours (pinned_bytes=0, then the RAM-tier curve over f, the
fraction of states kept in RAM, ``--curve``), deepspeed (both of ``ds-nonpipe``: buffer_count
4, and ``ds-pipe``: pipeline_read/write, buffer_count 12; sub_group_size 1e8; each can be
named alone). Each system runs in its own
child process. Every step is timed as forward+backward, then the optimizer step (CUDA synced);
the bytes each moved come from the executor's stats (ours) and /proc/self/io (both).
Output: a table, JSON (machine, git SHA, config, every step, bounds, ratios) and a PNG.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _measure as m  # noqa: E402
import _report  # noqa: E402
from _common import ROOT, git_sha  # noqa: E402

FULL = {"hidden": 2048, "intermediate": 5632, "layers": 16, "heads": 16, "vocab": 32000,
        "seq": 512}  # fmt: skip
TINY = {"hidden": 64, "intermediate": 160, "layers": 2, "heads": 4, "vocab": 512, "seq": 32}
DS_CONFIGS = {"ds-nonpipe": (4, False), "ds-pipe": (12, True)}  # buffer_count, pipelined


def build_model(shape: dict, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"], vocab_size=shape["vocab"],
        max_position_embeddings=max(2048, shape["seq"]), tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.config.use_cache = False
    return model


def batch(shape: dict, device):
    import torch

    gen = torch.Generator().manual_seed(1)
    return torch.randint(3, shape["vocab"], (1, shape["seq"]), generator=gen).to(device)


def proc_io() -> tuple[int, int]:
    """(read_bytes, write_bytes) this process made the block layer move (O_DIRECT included)."""
    got = {}
    with open("/proc/self/io") as f:
        for line in f:
            key, _, value = line.partition(":")
            got[key] = int(value)
    return got.get("read_bytes", 0), got.get("write_bytes", 0)


class Timer:
    """One training step at a time: forward+backward, then the optimizer step."""

    def __init__(self, device):
        self.device = device

    def step(self, forward_backward, optimizer_step, stats=None) -> dict:
        io0, s0 = proc_io(), stats() if stats else None
        t0 = time.perf_counter()
        forward_backward()
        m.sync(self.device)
        t1 = time.perf_counter()
        io1, s1 = proc_io(), stats() if stats else None
        optimizer_step()
        m.sync(self.device)
        t2 = time.perf_counter()
        io2 = proc_io()
        row = {
            "fwd_bwd_s": t1 - t0, "step_s": t2 - t1, "total_s": t2 - t0,
            "disk_read_bytes": io2[0] - io0[0], "disk_write_bytes": io2[1] - io0[1],
            "fwd_bwd_disk_read_bytes": io1[0] - io0[0],
            "fwd_bwd_disk_write_bytes": io1[1] - io0[1],
        }  # fmt: skip
        if stats:
            s2 = stats()
            row["state_read_bytes"] = s2["disk_bytes"] - s0["disk_bytes"]
            row["state_write_bytes"] = s2["disk_write_bytes"] - s0["disk_write_bytes"]
            row["state_read_during_fwd_bwd"] = s1["disk_bytes"] - s0["disk_bytes"]
            row["stall_s"] = s2["stall_s"] - s0["stall_s"]
        return row


# -- the systems (each in its own child process) -------------------------------------------------
def run_bounds(args, shape, result) -> None:
    """Write then cold-read a scratch file as large as the states, raw AioEngine, O_DIRECT."""
    import torch

    from infinity import AioConfig
    from infinity.io import AioEngine, PinnedPool

    n = sum(p.numel() for p in build_model(shape, "meta").parameters())
    nbytes = min(12 * n, parse(args.bound_bytes))
    piece, inflight = 64 << 20, 8
    path = os.path.join(args.dir, "bound.bin")
    m.remove(path)
    pool = PinnedPool(inflight * piece)
    bufs = [pool.alloc(piece) for _ in range(inflight)]
    for b in bufs:
        b.copy_(torch.randint(0, 256, (piece,), dtype=torch.uint8))
    try:
        with AioEngine(AioConfig(lanes=4)) as eng:
            start, pending = time.perf_counter(), []
            for k, off in enumerate(range(0, nbytes, piece)):
                if len(pending) == inflight:
                    pending.pop(0).result()
                take = min(piece, nbytes - off)
                pending.append(eng.pwrite(bufs[k % inflight][:take], path, off))
            for fut in pending:
                fut.result()
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            write_s = time.perf_counter() - start
    finally:
        for b in bufs:
            pool.free(b)
        pool.close()
    read = m.read_files([path], [args.dir])
    m.remove(path)
    result["limits"] = {
        "disk_write": {"gbps": nbytes / write_s / 1e9, "bytes": nbytes, "s": write_s,
                       "method": f"infinity AioEngine pwrite, {inflight} x 64 MiB in flight, "
                                 "4 lanes, O_DIRECT, then fsync"},
        "disk_read": read,
    }  # fmt: skip


def run_ours(args, shape, result) -> None:
    import torch

    from infinity.training import OffloadedAdamW

    device = torch.device(args.device)
    model = build_model(shape, device)
    ids = batch(shape, device)
    timer = Timer(device)
    store = os.path.join(args.dir, "ours")
    result["params"] = sum(p.numel() for p in model.parameters())

    def fwd_bwd():
        model(input_ids=ids, labels=ids).loss.backward()

    for f in (0.0, *args.curve):
        m.remove(store)
        opt = OffloadedAdamW(model.parameters(), store, lr=1e-5, weight_decay=0.01,
                             pinned_bytes=0, fused=True)  # fmt: skip
        state = sum(t.unit.nbytes for t in opt._tiles)
        tile = max(t.unit.nbytes for t in opt._tiles)
        if f:
            opt.close()
            m.remove(store)
            opt = OffloadedAdamW(model.parameters(), store, lr=1e-5, weight_decay=0.01,
                                 pinned_bytes=int(f * state) + 3 * tile, fused=True)  # fmt: skip
        steps = []
        for k in range(args.steps if not f else max(3, args.steps - 1)):
            row = timer.step(fwd_bwd, opt.step, opt.stats)
            opt.zero_grad(set_to_none=True)
            row["step"] = k
            steps.append(row)
            print(f"[ours f={f}] step {k}: fwd+bwd {row['fwd_bwd_s']:.2f} s, "
                  f"step {row['step_s']:.2f} s", flush=True)  # fmt: skip
        stats = opt.stats()
        result.setdefault("runs", []).append({
            "label": f"ours f={f:g}", "f": f, "state_bytes": state, "tile_bytes": tile,
            "resident_pinned_bytes": stats["resident_pinned_bytes"], "plan": stats["plan"],
            "steps": steps,
        })  # fmt: skip
        m.write_json(args.part, result)
        opt.close()
        m.remove(store)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["peak_gpu_bytes"] = m.peak_gpu(device)


def run_deepspeed(args, shape, result, name: str) -> None:
    import torch

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(m.free_port()))  # fmt: skip
    import deepspeed

    buffers, pipelined = DS_CONFIGS[name]
    swap = os.path.join(args.dir, name)
    m.remove(swap)
    os.makedirs(swap)
    cfg = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True}, "gradient_clipping": 0.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "weight_decay": 0.01}},
        "zero_optimization": {
            "stage": 3, "sub_group_size": int(args.ds_sub_group),
            "offload_optimizer": {"device": "nvme", "nvme_path": swap, "pin_memory": True,
                                  "buffer_count": buffers, "pipeline_read": pipelined,
                                  "pipeline_write": pipelined},
        },
        "aio": {"block_size": 8388608, "queue_depth": 32, "intra_op_parallelism": 8,
                "single_submit": False, "overlap_events": True},
        "steps_per_print": 10**9, "wall_clock_breakdown": False,
    }  # fmt: skip
    device = torch.device(args.device)
    deepspeed.init_distributed()
    model = build_model(shape, device)
    result["params"] = sum(p.numel() for p in model.parameters())
    result["config"] = cfg
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=cfg)  # fmt: skip
    ids = batch(shape, device)
    timer = Timer(device)
    loss = {}

    def fwd_bwd():
        loss["v"] = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss["v"])

    steps = []
    for k in range(args.steps):
        row = timer.step(fwd_bwd, engine.step)
        row["step"] = k
        steps.append(row)
        print(f"[{name}] step {k}: fwd+bwd {row['fwd_bwd_s']:.2f} s, step {row['step_s']:.2f} s",
              flush=True)  # fmt: skip
        result["runs"] = [{"label": name, "buffer_count": buffers, "pipelined": pipelined,
                           "steps": steps}]  # fmt: skip
        m.write_json(args.part, result)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["peak_gpu_bytes"] = m.peak_gpu(device)
    m.remove(swap)


def child(args) -> None:
    shape = TINY if args.tiny else FULL
    result = {"system": args.system, "status": "ok", "pid": os.getpid()}
    try:
        if args.system == "bounds":
            run_bounds(args, shape, result)
        elif args.system == "ours":
            run_ours(args, shape, result)
        else:
            run_deepspeed(args, shape, result, args.system)
    except BaseException as exc:  # noqa: BLE001 - the parent reports it
        result["status"] = "error"
        result["error"] = repr(exc)[:2000]
        result["traceback"] = traceback.format_exc()[-6000:]
        print(result["traceback"], file=sys.stderr, flush=True)
    m.write_json(args.part, result)


# -- the parent: run, summarise, report ----------------------------------------------------------
def parse(text) -> int:
    return m.parse_size(text)


def summarise(out: dict) -> None:
    sys_ = out["systems"]
    lim = sys_.get("bounds", {}).get("limits", {})
    r_bw = (lim.get("disk_read") or {}).get("gbps")
    w_bw = (lim.get("disk_write") or {}).get("gbps")
    rows = []
    for name, res in sys_.items():
        n = res.get("params")
        for run in res.get("runs", []):
            timed = run["steps"][1:] or run["steps"]
            row = {
                "system": name, "label": run["label"], "params": n,
                "step_s": statistics.median(s["step_s"] for s in timed),
                "fwd_bwd_s": statistics.median(s["fwd_bwd_s"] for s in timed),
                "total_s": statistics.median(s["total_s"] for s in timed),
                "disk_bytes_per_param": statistics.median(
                    (s["disk_read_bytes"] + s["disk_write_bytes"]) / n for s in timed),
            }  # fmt: skip
            if "state_read_bytes" in timed[0]:
                row["state_read_during_fwd_bwd_bytes"] = statistics.median(
                    s["state_read_during_fwd_bwd"] for s in timed
                )
            if r_bw and w_bw and n:
                f = run.get("f", 0.0)
                bound = (1 - f) * n * (12 / (r_bw * 1e9) + 12 / (w_bw * 1e9))
                row["io_bound_s"] = bound
                row["bound_over_step"] = bound / row["step_s"] if row["step_s"] else None
            rows.append(row)
    out["rows"] = rows
    ds = [r["step_s"] for r in rows if r["system"].startswith("ds-")]
    ours = next((r for r in rows if r["label"] == "ours f=0"), None)
    if ds and ours:
        out["speedup_step_vs_best_deepspeed"] = min(ds) / ours["step_s"]
        best_total = min(r["total_s"] for r in rows if r["system"].startswith("ds-"))
        out["speedup_whole_step_vs_best_deepspeed"] = best_total / ours["total_s"]
    print(f"\ndisk: read {r_bw} GB/s, write {w_bw} GB/s (measured in this run)")
    head = f"{'run':<14}{'step s':>9}{'fwd+bwd s':>11}{'whole s':>9}{'B/param':>9}{'bound s':>9}"
    print(head + f"{'bound/step':>12}")
    for r in rows:
        bound = r.get("io_bound_s")
        ratio = r.get("bound_over_step")
        print(
            f"{r['label']:<14}{r['step_s']:>9.2f}{r['fwd_bwd_s']:>11.2f}{r['total_s']:>9.2f}"
            f"{r['disk_bytes_per_param']:>9.1f}"
            f"{(f'{bound:.2f}' if bound else '-'):>9}{(f'{ratio:.2f}' if ratio else '-'):>12}"
        )
    if "speedup_step_vs_best_deepspeed" in out:
        print(
            f"optimizer step: {out['speedup_step_vs_best_deepspeed']:.2f}x faster than the best "
            f"DeepSpeed; whole step {out['speedup_whole_step_vs_best_deepspeed']:.2f}x"
        )


def plot(out: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    rows = out.get("rows", [])
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    main = [r for r in rows if r["system"] != "ours" or r["label"] == "ours f=0"]
    labels = [r["label"] for r in main]
    a.bar(labels, [r["fwd_bwd_s"] for r in main], label="forward+backward")
    a.bar(labels, [r["step_s"] for r in main], bottom=[r["fwd_bwd_s"] for r in main],
          label="optimizer step")  # fmt: skip
    bound = next((r.get("io_bound_s") for r in main if r["label"] == "ours f=0"), None)
    if bound:
        a.axhline(bound, color="k", ls="--", label="I/O bound, 24 B/param")
    a.set_ylabel("s per training step")
    a.set_title(f"{out['config']['params'] / 1e9:.2f}B params, {out['machine_gpu']}")
    a.legend()
    curve = sorted((r for r in rows if r["system"] == "ours"), key=lambda r: r["label"])
    fs = [float(r["label"].split("=")[1]) for r in curve]
    b.plot(fs, [r["step_s"] for r in curve], "o-", label="ours, measured")
    b.plot(fs, [r.get("io_bound_s") or 0 for r in curve], "k--", label="(1-f) N 24 B / BW")
    b.set_xlabel("f: fraction of the states kept in RAM")
    b.set_ylabel("s per optimizer step")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dir", default=os.path.join(ROOT, ".t", "train"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--systems", default="bounds,ours,deepspeed")
    ap.add_argument("--steps", type=int, default=4, help="steps per run (the first is not timed)")
    ap.add_argument(
        "--curve",
        default="0.25,0.5,0.75",
        help="fractions f of the states kept in RAM to measure ('' for none)",
    )
    ap.add_argument("--device", default=None)
    ap.add_argument("--bound-bytes", default="8GiB", help="the scratch file of the disk bounds")
    ap.add_argument("--ds-sub-group", type=float, default=1e8)
    ap.add_argument("--system-timeout", type=float, default=900)
    ap.add_argument(
        "--cgroup-mem",
        default=None,
        help="run each system (not the bounds) under this cgroup memory.max",
    )
    ap.add_argument("--system", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.curve = [float(f) for f in args.curve.split(",") if f.strip()]
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(args.dir, exist_ok=True)
    if args.system:
        child(args)
        return
    shape = TINY if args.tiny else FULL
    names = []
    for s in args.systems.split(","):
        names += list(DS_CONFIGS) if s == "deepspeed" else [s]
    out = {
        "bench": "train", "date": datetime.date.today().isoformat(), "git_sha": git_sha(),
        "machine_gpu": _report.gpu_name(), "machine": _report.machine(args.dir),
        "command": " ".join(sys.argv), "torch": torch.__version__,
        "config": {**shape, "params": sum(p.numel() for p in build_model(shape, "meta")
                                          .parameters()), "steps": args.steps,
                   "device": args.device, "ds_sub_group_size": args.ds_sub_group},
        "systems": {},
    }  # fmt: skip
    json_path = args.json or os.path.join(args.dir, "train.json")
    for name in names:
        part = os.path.join(args.dir, f"{name}.part.json")
        m.remove(part)
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--system",
            name,
            "--part",
            part,
            "--dir",
            args.dir,
            "--steps",
            str(args.steps),
            "--device",
            args.device,
            "--bound-bytes",
            str(args.bound_bytes),
            "--ds-sub-group",
            str(args.ds_sub_group),
        ]
        cmd += ["--tiny"] * args.tiny + ["--curve", ",".join(map(str, args.curve))]
        print(f"== {name}", flush=True)
        cgroup = None
        if args.cgroup_mem and name != "bounds":
            cgroup = m.Cgroup(f"infinity-train-{name}-{os.getpid()}", parse(args.cgroup_mem))
            cmd = cgroup.wrap(cmd)
        start = time.time()
        try:
            subprocess.run(cmd, timeout=args.system_timeout, check=False)
        except subprocess.TimeoutExpired:
            print(f"{name}: timed out after {args.system_timeout} s", flush=True)
        finally:
            cgroup_stats = cgroup.stats() if cgroup else None
            if cgroup:
                cgroup.remove()
        try:
            with open(part) as f:
                res = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            res = {"system": name, "status": "error", "error": f"no result: {exc!r}"}
        res["wall_s"] = time.time() - start
        res["cgroup"] = cgroup_stats
        out["systems"][name] = res
        m.write_json(json_path, out)
    summarise(out)
    m.write_json(json_path, out)
    plot(out, os.path.splitext(json_path)[0] + ".png")
    print(f"json: {json_path}")


if __name__ == "__main__":
    main()
