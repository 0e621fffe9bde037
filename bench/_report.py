"""Output of bench/forward.py: the bound of every row, the table, the machine, the plot."""

from __future__ import annotations

import os
import platform
import subprocess

GB = 1e9
PEERS = ("accelerate", "airllm", "deepspeed")


def gpu_name() -> str:
    """The first GPU's name, short ("H200", "H100-80GB-HBM3"), else "cpu"; it names the result
    file. forward.py asks before its children run, so this must not make a CUDA context here:
    one holds GPU memory in the parent while each child measures (and sizes its budgets from the
    free memory). So torch only when this process has initialised CUDA anyway, else NVML
    (pynvml, makes no context) when installed, else nvidia-smi, else "cpu"."""
    name = None
    try:
        import torch

        if torch.cuda.is_initialized() and torch.cuda.device_count():
            name = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a name for a file: fall through to the next way
        pass
    name = name or _nvml_name() or _nvidia_smi_name()
    return name.replace("NVIDIA ", "").replace(" ", "-") if name else "cpu"


def _nvml_name() -> str | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            if not pynvml.nvmlDeviceGetCount():
                return None
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None
    return (name.decode() if isinstance(name, bytes) else name).strip() or None


def _nvidia_smi_name() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0].strip() if out and out[0].strip() else None


def machine(directory: str) -> dict:
    try:
        from infinity.info import collect

        return collect(directory, check_aio=False)
    except Exception as exc:  # noqa: BLE001 - the figures matter more than the machine details
        return {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "collect_error": repr(exc),
        }


def _limits(out: dict) -> dict:
    b = out["systems"].get("bounds", {})
    lim = b.get("limits", {})
    rows = b.get("rows", [])
    floor = next((r["s"] for r in rows if r.get("floor") and r["kind"] == "pass"), None)
    decode_floor = {r["batch"]: r["s"] for r in rows if r.get("floor") and r["kind"] == "decode"}
    w = out["config"]["weight_bytes"]
    disk = (lim.get("disk") or {}).get("gbps")
    h2d = (lim.get("h2d") or {}).get("gbps")
    return {
        "disk_read_gbps": disk,
        "disk_method": (lim.get("disk") or {}).get("method"),
        "h2d_gbps": h2d,
        "compute_floor_s": floor,
        "compute_floor_decode_s_per_token": decode_floor,
        "disk_bound_s": w / (disk * GB) if disk else None,
        "pcie_bound_s": w / (h2d * GB) if h2d else None,
        "formula": "bound = max((W - C_gpu - C_ram) / disk, (W - C_gpu) / pcie, compute floor); "
        "W = the decoder layers' bytes, C_ram = layers held in RAM (pinned, or the page cache "
        "for a warm pass); ratio = bound / measured (1.0 is perfect)",
    }


def _annotate(r: dict, lim: dict) -> None:
    w, s = r.get("weight_bytes"), r.get("s")
    if w is None or not s or r.get("floor"):
        return
    if r["kind"] == "paired":  # its own bound, measured beside each pass
        r["cold_bound_over_first"] = r["bound_over_pass_median"]
        return
    cr, cg = r.get("c_ram_bytes") or 0, r.get("c_gpu_bytes") or 0
    terms = {}
    if lim["disk_read_gbps"]:
        terms["disk_s"] = max(0, w - cg - cr) / (lim["disk_read_gbps"] * GB)
    if lim["h2d_gbps"]:
        terms["pcie_s"] = max(0, w - cg) / (lim["h2d_gbps"] * GB)
    floor = (
        lim["compute_floor_decode_s_per_token"].get(r.get("batch"))
        if r["kind"] == "decode"
        else lim["compute_floor_s"]
    )
    if floor:
        terms["compute_s"] = floor
    r["effective_gbps"] = w / s / GB
    if r.get("first_s") and lim["disk_read_gbps"] and r["kind"] != "decode":
        # the first pass starts cold: everything comes from disk, whatever the budgets
        r["cold_bound_s"] = w / (lim["disk_read_gbps"] * GB)
        r["cold_bound_over_first"] = r["cold_bound_s"] / r["first_s"]
    if terms:
        r["bound_terms"] = terms
        r["bound_s"] = max(terms.values())
        r["bound_over_measured"] = r["bound_s"] / s
    extra = r.get("also_streams_bytes")  # DeepSpeed streams embeddings and head too
    if extra and lim["disk_read_gbps"]:
        full = (w + extra - cg - cr) / (lim["disk_read_gbps"] * GB)
        r["bound_with_nonlayer_s"] = max(full, r.get("bound_s") or 0)
        r["bound_with_nonlayer_over_measured"] = r["bound_with_nonlayer_s"] / s


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def finish(out: dict, shape) -> None:
    """Bounds and ratios into every row, ``out["limits"]``, then print the table."""
    lim = out["limits"] = _limits(out)
    caches = {
        p.get("cache")
        for res in out["systems"].values()
        for r in res.get("rows", [])
        for p in r.get("passes", [])
    }
    out["cold_method"] = sorted(c for c in caches if c and c != "warm")
    head = [
        "system",
        "run",
        "1st s",
        "cold bound/1st",
        "s",
        "GB/s",
        "bound s",
        "bound/meas",
        "peak GPU GB",
        "read GB",
        "tok/s",
    ]
    table = []
    for name, res in out["systems"].items():
        for r in res.get("rows", []):
            _annotate(r, lim)
            gb = lambda v: None if v is None else v / GB  # noqa: E731
            table.append(
                [
                    name,
                    r["name"],
                    _fmt(r.get("first_s"), ".3f"),
                    _fmt(r.get("cold_bound_over_first"), ".3f"),
                    _fmt(r.get("s"), ".4f"),
                    _fmt(r.get("effective_gbps"), ".2f"),
                    _fmt(r.get("bound_s"), ".3f"),
                    _fmt(r.get("bound_over_measured"), ".3f"),
                    _fmt(gb(r.get("peak_gpu_bytes")), ".2f"),
                    _fmt(gb(r.get("bytes_read")), ".2f"),
                    _fmt(r.get("tokens_per_s"), ".2f"),
                ]
            )
        if res.get("status") != "ok":
            why = [e["error"] for e in res.get("errors", [])] or res.get("notes", [])
            errs = "; ".join(why)[:300]
            table.append([name, f"status {res.get('status')}: {errs}"] + [""] * 8)
    title = (
        f"forward, {shape.layers} layers x {shape.layer_bytes / GB:.3f} GB, disk "
        f"{_fmt(lim['disk_read_gbps'], '.2f')} GB/s, pinned->GPU {_fmt(lim['h2d_gbps'], '.1f')}"
        f" GB/s, disk bound {_fmt(lim['disk_bound_s'], '.2f')} s, PCIe bound "
        f"{_fmt(lim['pcie_bound_s'], '.3f')} s (s: s/forward, or s/token for decode)"
    )
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(*head, title=title)
        for row in table:
            t.add_row(*row)
        Console(width=200).print(t)
    except ImportError:
        widths = [max(len(str(x[i])) for x in [head, *table]) for i in range(len(head))]
        widths[1] = min(widths[1], 60)
        print(title)
        for row in [head, *table]:
            print("  ".join(str(x)[:w].ljust(w) for x, w in zip(row, widths, strict=True)))
    _print_disk(out)


def _print_disk(out: dict) -> None:
    """Our first passes: how busy the disk was and how fast it read; the paired probes."""
    for r in out["systems"].get("infinity", {}).get("rows", []):
        for k, p in enumerate(r.get("passes", [])):
            io = p.get("io")
            if io and io.get("read_gbps_while_busy"):
                print(
                    f"{r['name']}, pass {k + 1}: {io['pass_s']:.3f} s, disk busy "
                    f"{io['disk_busy_fraction']:.1%}, {io['read_gbps_while_busy']:.2f} GB/s while "
                    f"busy, first read at {io['first_read_after_s']:.3f} s, "
                    f"{io['tail_after_last_read_s']:.3f} s after the last"
                )
        fresh = r.get("fresh_pair")
        if fresh:
            print(
                f"{r['name']}, the process's first pass, then a raw read: "
                f"{fresh['probe']['gbps']:.2f} GB/s, bound {fresh['bound_s']:.3f} s, "
                f"ratio {fresh['bound_over_pass']:.3f}"
            )
        for x in r.get("pairs", []):
            io = x["pass"].get("io") or {}
            print(
                f"{r['name']} ({x['order']}): raw {x['probe']['gbps']:.2f} GB/s, bound "
                f"{x['bound_s']:.3f} s, pass {x['pass']['s']:.3f} s, ratio "
                f"{x['bound_over_pass']:.3f}; disk busy {io.get('disk_busy_fraction') or 0:.1%} "
                f"at {io.get('read_gbps_while_busy') or 0:.2f} GB/s"
            )
    info = out["systems"].get("infinity", {}).get("info", {}).get("fp8_vs_bf16_logits")
    if info:
        print(f"fp8 vs bf16 logits: {info}")


def plot(out: dict, shape, path: str) -> None:
    """Time per forward against the pinned budget: ours as a line, peers flat, the bound."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        out.setdefault("notes", []).append("matplotlib not installed: no plot")
        print("matplotlib not installed: no plot")
        return
    lim, w = out["limits"], shape.weight_bytes
    fig, ax = plt.subplots(figsize=(12, 5.5))
    ours = [
        r
        for r in out["systems"].get("infinity", {}).get("rows", [])
        if r["kind"] == "pass"
        and r.get("dtype") == "bf16"
        and r.get("granularity") != "matrix"
        and r.get("verify_checksums", True)
    ]

    def held(r) -> float:  # what the plan keeps resident across passes, pinned RAM and GPU
        return ((r.get("c_ram_bytes") or 0) + (r.get("c_gpu_bytes") or 0)) / w

    ours.sort(key=held)
    if ours:
        xs = [held(r) for r in ours]
        ax.plot(xs, [r["s"] for r in ours], "o-", color="C0", lw=2, label="infinity (later passes)")
        ax.plot(
            xs,
            [r["first_s"] for r in ours],
            "o--",
            color="C0",
            alpha=0.5,
            label="infinity (1st pass after load)",
        )
    for r in out["systems"].get("infinity", {}).get("rows", []):
        if r["kind"] == "pass" and r.get("dtype") == "fp8":
            ax.plot([held(r)], [r["s"]], "s", color="C0", label="infinity fp8 store")
        if r["kind"] == "pass" and r.get("granularity") == "matrix":
            peak = (r.get("peak_gpu_bytes") or 0) / GB
            ax.plot(
                [held(r)], [r["s"]], "^", color="C0", label=f"infinity matrix, {peak:.2f} GB GPU"
            )
    k = 1
    for name in PEERS:
        for r in out["systems"].get(name, {}).get("rows", []):
            if r["kind"] == "pass" and r.get("s"):
                ax.axhline(r["s"], ls=":", color=f"C{k}", label=r["name"])
                k += 1
    if lim["disk_read_gbps"] or lim["h2d_gbps"]:
        grid = [i / 100 for i in range(101)]
        bound = [
            max(
                (1 - x) * lim["disk_bound_s"] if lim["disk_bound_s"] else 0,
                lim["pcie_bound_s"] or 0,
                lim["compute_floor_s"] or 0,
            )
            for x in grid
        ]
        ax.plot(grid, bound, "k-", lw=1.5, label="bound: max(disk, PCIe, compute)")
    if lim["compute_floor_s"]:
        ax.axhline(lim["compute_floor_s"], ls="--", color="gray", label="all layers on the GPU")
    ax.set_yscale("log")
    ax.set_xlabel("layers kept resident in pinned RAM + GPU (fraction of the layers' bytes)")
    ax.set_ylabel("seconds per forward (batch 1, 16 tokens)")
    gpus = out.get("machine", {}).get("gpus") or [{"name": gpu_name()}]
    title = f"Llama-70B-shaped, {shape.layers} layers ({w / GB:.2f} GB), cold, {gpus[0]['name']}"
    cap = out.get("config", {}).get("cgroup_mem")
    ax.set_title(title + (f"; every system under cgroup memory.max {cap}" if cap else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
