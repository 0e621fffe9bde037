"""Benchmark (issue 6): one batch-1 forward (16-token prompt) of a Llama-70B-shaped model cut to
N decoder layers, every layer on disk, page cache dropped before each timed pass; ours against
accelerate's disk offload, AirLLM's per-layer loading and DeepSpeed ZeRO-3 NVMe offload, in one
invocation, judged against the bound measured in the same run.

    python bench/forward.py --dir .t/forward --json $OUT/forward.json            # N=8, all
    python bench/forward.py --tiny --systems synth,airllm,infinity                  # CI, CPU ok
    python bench/forward.py ... --cgroup-mem 8GiB     # every system in a memory-capped cgroup

Systems (``--systems``, run in that order): synth (the checkpoint: random bf16 safetensors,
cached), infinity, accelerate, airllm, deepspeed; "bounds" (disk and pinned->GPU bandwidth,
compute floor) always runs first. Each system runs in its own child process (``--system X
--json F``), so a crash, a hang (``--system-timeout``, ``--deadline``) or a memory cap
(``--cgroup-mem``) stays with that system. Output: a table, JSON (machine, git SHA, config,
every pass, bound and ratio) and a PNG beside the JSON (when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _measure as m  # noqa: E402
import _report  # noqa: E402
from _common import ROOT, git_sha  # noqa: E402
from _measure import parse_size  # noqa: E402
from _synth import Shape, build, disk_report  # noqa: E402

FULL = {
    "layers": 8,
    "hidden": 8192,
    "intermediate": 28672,
    "heads": 64,
    "kv_heads": 8,
    "vocab": 32000,
}
TINY = {"layers": 2, "hidden": 256, "intermediate": 688, "heads": 4, "kv_heads": 2, "vocab": 1000}
LEFTOVERS = ("deepspeed-nvme", "infinity-store-bf16", "infinity-store-fp8", "accelerate-offload")
CHILD_ONLY = ("system", "child_config", "capped")
SYSTEMS = ("synth", "infinity", "accelerate", "airllm", "deepspeed")  # the order they run in


class Ctx:
    """What a system's run needs: config, device, paths, and its result (saved after each row)."""

    def __init__(self, args, system: str, out_path: str | None, capped: bool):
        import torch

        self.args, self.system, self.out_path = args, system, out_path
        self.shape = shape_of(args)
        self.device = torch.device(args.device)
        self.work, self.ckpt = args.dir, ckpt_dir(args)
        self.cold_paths = [args.dir]
        self.mem_cap = parse_size(args.cgroup_mem) if capped and args.cgroup_mem else None
        L = self.shape.layer_bytes
        auto = self.shape.nonlayer_bytes + 2 * L + L // 8  # 2 streaming buffers, no resident
        self.gpu_bytes = auto if args.gpu_bytes == "auto" else parse_size(args.gpu_bytes)
        self.result = {
            "system": system,
            "status": "ok",
            "rows": [],
            "notes": [],
            "errors": [],
            "disk": [],
            "pid": os.getpid(),
            "memory_cap_bytes": self.mem_cap,
        }

    def log(self, msg: str) -> None:
        print(f"[{self.system}] {msg}", flush=True)

    def note(self, msg: str) -> None:
        self.result["notes"].append(msg)
        self.log(msg)

    def error(self, where: str, exc: BaseException, tb: str) -> None:
        self.result["errors"].append({"where": where, "error": repr(exc), "traceback": tb})
        self.log(f"ERROR in {where}: {exc!r}")
        self.save()

    def save(self) -> None:
        if self.out_path:
            m.write_json(self.out_path, self.result)

    def disk(self, when: str) -> None:
        rep = disk_report(self.work)
        self.result["disk"].append({"when": when, **rep})
        self.log(
            f"disk {when}: {rep['free_bytes'] / 1e9:.1f} GB free, under {self.work}: "
            + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in rep["under"].items())
        )

    def drop(self) -> str:
        return m.drop_page_cache(self.cold_paths)

    def ids(self, batch: int):
        import torch

        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, self.shape.vocab, (batch, self.args.prompt), generator=gen)
        return ids.to(self.device)

    def decodes(self, system: str) -> bool:
        return self.args.decode and system in self.args.decode_systems

    def add_row(self, row: dict) -> dict:
        row = {"system": self.system, "kind": "pass", **row}
        self.result["rows"].append(row)
        self.save()
        unit = "s/token" if row["kind"] == "decode" else "s/forward"
        s = row.get("s")
        self.log(f"{row['name']}: {s:.4f} {unit}" if s is not None else row["name"])
        return row

    def passes(self, name, fn, n, cold=True, steady=False, stats=None, **fields) -> dict:
        """``n`` timed passes (cold: page cache dropped before each); ``steady``: the row's
        figure is the median of the passes after the first."""
        out = []
        for _ in range(max(1, n)):
            before = stats() if stats else None
            p = m.timed_pass(fn, self.device, self.cold_paths if cold else None)
            if stats:
                after = stats()
                p["stats"] = after
                p["stats_delta"] = {
                    k: after[k] - before[k]
                    for k in after
                    if isinstance(after[k], int | float)
                    and k in before
                    and isinstance(before[k], int | float)
                }
            out.append(p)
        tail = out[1:] if steady and len(out) > 1 else out
        peaks = [p["peak_gpu_bytes"] for p in out if p["peak_gpu_bytes"] is not None]
        reads = [p["bytes_read"] for p in tail if p["bytes_read"] is not None]
        return self.add_row(
            {
                "name": name,
                "passes": out,
                "first_s": out[0]["s"],
                "s": statistics.median(p["s"] for p in tail),
                "peak_gpu_bytes": max(peaks) if peaks else None,
                "bytes_read": statistics.median(reads) if reads else None,
                "cache": out[0]["cache"],
                **fields,
            }
        )


def shape_of(args) -> Shape:
    return Shape(args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab)


def ckpt_dir(args) -> str:
    s = shape_of(args)
    name = f"ckpt-L{s.layers}-H{s.hidden}-I{s.intermediate}-A{s.heads}-K{s.kv_heads}-V{s.vocab}"
    return os.path.join(args.dir, f"{name}-seed{args.seed}")


def run_system(args, system: str, out_path: str | None, capped: bool) -> dict:
    """Run one system in this process; its result (also written to ``out_path``)."""
    import _ours
    import _peers

    run = {
        "bounds": _peers.run_bounds,
        "accelerate": _peers.run_accelerate,
        "airllm": _peers.run_airllm,
        "deepspeed": _peers.run_deepspeed,
        "infinity": _ours.run_infinity,
    }[system]
    ctx = Ctx(args, system, out_path, capped)
    start = time.perf_counter()
    try:
        run(ctx)
    except Exception as exc:  # noqa: BLE001 - recorded; the other systems still run
        ctx.error(system, exc, traceback.format_exc())
    res = ctx.result
    if res["errors"] and res["status"] == "ok":
        res["status"] = "partial" if res["rows"] else "error"
    res["wall_s"] = time.perf_counter() - start
    ctx.save()
    return res


def spawn(args, system: str, cfg_path: str, timeout_s: float | None) -> dict:
    """Run one system in a child process (inside a memory cgroup with --cgroup-mem)."""
    out = os.path.join(args.dir, f"result-{system}-{os.getpid()}.json")
    me = os.path.abspath(__file__)
    cmd = [sys.executable, me, "--system", system, "--child-config", cfg_path, "--json", out]
    cg, cg_error = None, None
    if args.cgroup_mem and system != "bounds":
        try:
            cg = m.Cgroup(f"infinity-bench-{system}-{os.getpid()}", parse_size(args.cgroup_mem))
            cmd = cg.wrap([*cmd, "--capped"])
        except OSError as exc:
            cg_error = f"cgroup not made ({exc!r}): ran without the memory cap"
    print(f"=== {system}" + (f" (cgroup {cg.path}, {args.cgroup_mem})" if cg else ""), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()  # our child, by its pid
        proc.wait()
        rc = "timeout"
    try:
        with open(out) as f:
            res = json.load(f)
        os.remove(out)
    except (OSError, ValueError):
        res = {"system": system, "status": "error", "rows": [], "notes": [], "errors": []}
    if rc != 0:
        res["status"] = "timeout" if rc == "timeout" else ("partial" if res["rows"] else "error")
        res["errors"].append({"where": "child process", "error": f"exit status {rc}"})
    res["returncode"], res["child_wall_s"] = rc, time.perf_counter() - start
    if cg_error:
        res["notes"].append(cg_error)
    if cg:
        res["cgroup"] = cg.stats()
        cg.remove()
    return res


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    for key in FULL:
        ap.add_argument("--" + key.replace("_", "-"), type=int, help=f"default {FULL[key]}")
    ap.add_argument("--tiny", action="store_true", help=f"tiny model {TINY}; CPU is fine")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--dir", help="work dir on the disk to test (default .t/forward)")
    ap.add_argument("--device", help="default cuda if available, else cpu")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--passes", type=int, default=3, help="ours, per pinned budget")
    ap.add_argument("--pinned-fractions", default="0.25,0.5,1.0")
    ap.add_argument("--unverified", action="store_true", help="ours: also without checksums")
    ap.add_argument(
        "--matrix-gpu",
        default="",
        help="ours: matrix granularity also at these GPU budgets, GiB (e.g. 2,4,8): the "
        "granularity / GPU memory / time trade-off",
    )
    ap.add_argument(
        "--pairs",
        type=int,
        help="ours: cold first passes after load, each beside a raw read of the same files "
        "(default 4, 2 with --tiny; 0: none)",
    )
    ap.add_argument("--gpu-bytes", default="auto", help="ours; auto: head+embed + 2 layers")
    ap.add_argument("--infinity-dtypes", default="bf16,fp8")
    ap.add_argument("--airllm-variants", default="plain,prefetch")
    ap.add_argument("--airllm-passes", type=int, default=1)
    ap.add_argument("--ds-passes", type=int, default=3)
    ap.add_argument("--ds-weights", choices=("load", "random"), default="load")
    ap.add_argument("--ds-buffer-size", type=int, default=0, help="elements; 0: auto (3e8 at 70B)")
    ap.add_argument("--ds-block-size", type=int, default=8 << 20)
    ap.add_argument("--floor-repeats", type=int, default=5)
    ap.add_argument("--disk-probe-bytes", default="4GiB")
    ap.add_argument("--decode", action="store_true", help="also time generate (decode tokens/s)")
    ap.add_argument("--decode-systems", default="bounds,accelerate,infinity")
    ap.add_argument("--decode-batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--cgroup-mem", help="run each system in a cgroup with this memory.max")
    ap.add_argument(
        "--cap-headroom",
        default="2.5GiB",
        help="ours under --cgroup-mem: pinned budgets above cap - min(this, cap/3) are skipped",
    )
    ap.add_argument("--system-timeout", type=float, default=0, help="seconds per system; 0: none")
    ap.add_argument(
        "--deadline",
        type=float,
        default=0,
        help="seconds from the start: later "
        "systems get what is left less 30 s, none under 45 s; 0: none",
    )
    ap.add_argument("--inprocess", action="store_true", help="no child processes (no cgroup)")
    ap.add_argument("--keep", action="store_true", help="keep our stores and DeepSpeed's swap")
    ap.add_argument("--clean", action="store_true", help="delete the checkpoint at the end too")
    ap.add_argument("--json", help="default bench/results/forward-<gpu>-<date>.json")
    ap.add_argument("--replot", metavar="JSON", help="only redraw the PNG beside this result")
    ap.add_argument("--system", help=argparse.SUPPRESS)
    ap.add_argument("--child-config", help=argparse.SUPPRESS)
    ap.add_argument("--capped", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_config:  # a child: the parent's settings, then its own --system and --json
        with open(args.child_config) as f:
            saved = json.load(f)
        saved.update(
            system=args.system, json=args.json, child_config=args.child_config, capped=args.capped
        )
        return argparse.Namespace(**saved)
    base = TINY if args.tiny else FULL
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dir = os.path.abspath(args.dir or os.path.join(ROOT, ".t", "forward"))
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    args.systems = split(args.systems)
    unknown = set(args.systems) - set(SYSTEMS) - {"bounds"}
    if unknown:
        ap.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    args.decode_systems = split(args.decode_systems)
    args.airllm_variants = split(args.airllm_variants)
    args.infinity_dtypes = split(args.infinity_dtypes)
    args.pinned_fractions = [float(x) for x in split(args.pinned_fractions)]
    args.matrix_gpu = [float(x) for x in split(args.matrix_gpu)]
    args.decode_batches = [int(x) for x in split(args.decode_batches)]
    args.disk_probe_bytes = parse_size(args.disk_probe_bytes)
    if args.pairs is None:
        args.pairs = 2 if args.tiny else 4
    return args


def main() -> None:
    args = parse_args()
    if args.replot:  # the PNG again from a result's JSON
        with open(args.replot) as f:
            out = json.load(f)
        shape = shape_of(argparse.Namespace(**out["config"]))
        _report.plot(out, shape, os.path.splitext(args.replot)[0] + ".png")
        return
    if args.system:
        res = run_system(args, args.system, args.json, capped=args.capped)
        sys.exit(0 if res["status"] in ("ok", "partial") else 1)
    os.makedirs(args.dir, exist_ok=True)
    shape = shape_of(args)
    date = datetime.date.today().isoformat()
    name = f"forward-{_report.gpu_name()}-{date}.json"
    path = args.json or os.path.join(ROOT, "bench", "results", name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    out = {
        "benchmark": "forward",
        "config": {
            **{k: v for k, v in vars(args).items() if k not in CHILD_ONLY},
            "layer_bytes": shape.layer_bytes,
            "weight_bytes": shape.weight_bytes,
            "nonlayer_bytes": shape.nonlayer_bytes,
            "checkpoint": ckpt_dir(args),
        },
        "systems": {},
        "disk": [],
        "git_sha": git_sha(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": date,
    }
    start = time.perf_counter()
    out["synth"] = build(ckpt_dir(args), shape, args.seed, log=lambda s: print(s, flush=True))
    out["disk"].append({"when": "after synth", **disk_report(args.dir)})
    print(
        f"synth: {out['synth']}; disk free {out['disk'][-1]['free_bytes'] / 1e9:.1f} GB", flush=True
    )
    cfg_path = os.path.join(args.dir, f"args-{os.getpid()}.json")
    m.write_json(cfg_path, vars(args))
    for system in ["bounds"] + [s for s in args.systems if s != "synth"]:
        left = args.deadline - (time.perf_counter() - start) if args.deadline else None
        if left is not None and left < 45:
            msg = f"not run: {left:.0f} s left of --deadline {args.deadline:.0f} s"
            out["systems"][system] = {
                "system": system,
                "status": "skipped",
                "rows": [],
                "notes": [msg],
                "errors": [],
            }
            print(f"=== {system}: {msg}", flush=True)
            continue
        limits = [t for t in (args.system_timeout, left and left - 30) if t]
        if args.inprocess:
            res = run_system(args, system, None, capped=False)
        else:
            res = spawn(args, system, cfg_path, min(limits) if limits else None)
        for leftover in LEFTOVERS if not args.keep else ():  # a killed child's big files
            m.remove(os.path.join(args.dir, leftover))
        out["systems"][system] = res
        out["disk"].append({"when": f"after {system}", **disk_report(args.dir)})
        m.write_json(path, out)
    os.remove(cfg_path)
    if args.clean:
        m.remove(ckpt_dir(args))
    out["wall_s"] = time.perf_counter() - start
    out["machine"] = _report.machine(args.dir)
    _report.finish(out, shape)
    _report.plot(out, shape, os.path.splitext(path)[0] + ".png")
    m.write_json(path, out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
