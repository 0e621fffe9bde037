"""`infinity info`: what a user needs to know before offloading, as one dict."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import psutil

from infinity.io.fsinfo import MEMORY_FS, fs_info
from infinity.io.pinned import cgroup_memory, memlock_limit_bytes


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def pcie_link(bus_id: str) -> dict[str, Any]:
    """Current and maximum PCIe link of a PCI device, from sysfs."""
    dev = Path("/sys/bus/pci/devices") / bus_id.lower()
    keys = ("current_link_speed", "current_link_width", "max_link_speed", "max_link_width")
    return {key: _read(dev / key) for key in keys}


def gpus() -> list[dict[str, Any]]:
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        entry: dict[str, Any] = {
            "index": i,
            "name": props.name,
            "memory_bytes": props.total_memory,
            "capability": f"{props.major}.{props.minor}",
        }
        bus = getattr(props, "pci_bus_id", None)
        if bus is not None:
            domain = getattr(props, "pci_domain_id", 0)
            device = getattr(props, "pci_device_id", 0)
            entry["pci_bus_id"] = f"{domain:04x}:{bus:02x}:{device:02x}.0"
            entry["pcie"] = pcie_link(entry["pci_bus_id"])
        out.append(entry)
    return out


def aio_status() -> dict[str, Any]:
    from infinity.errors import AioUnavailableError
    from infinity.io import deepspeed_version, load_aio, load_gds

    status: dict[str, Any] = {"deepspeed": deepspeed_version()}
    try:
        load_aio()
        status["aio"] = {"loads": True}
    except AioUnavailableError as exc:
        status["aio"] = {"loads": False, "error": str(exc)}
    status["gds"] = {"loads": load_gds() is not None}
    return status


def host() -> dict[str, Any]:
    mem = psutil.virtual_memory()
    memlock = memlock_limit_bytes()
    root = os.geteuid() == 0
    cgroup = cgroup_memory()  # (limit, left under it) of the tightest memory cgroup, or None
    headroom = mem.available if cgroup is None else min(mem.available, cgroup[1])
    # CUDA-registered memory is not bounded by RLIMIT_MEMLOCK; mlock (DeepSpeed's locked
    # tensors) is, unless the process has CAP_IPC_LOCK (root).
    locked_headroom = headroom if (memlock is None or root) else min(memlock, headroom)
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "ram_total_bytes": mem.total,
        "ram_available_bytes": mem.available,
        "memlock_limit_bytes": memlock,
        "is_root": root,
        "cgroup_memory_limit_bytes": None if cgroup is None else cgroup[0],
        "pinned_headroom_bytes": headroom,
        "locked_headroom_bytes": locked_headroom,
    }


def collect(directory: str | None = None, check_aio: bool = True) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "gpus": gpus(),
        "host": host(),
    }
    if check_aio:
        info.update(aio_status())
    if directory is not None:
        fs = fs_info(directory).to_dict()
        fs["memory_backed"] = fs["fs_type"] in MEMORY_FS
        info["dir"] = fs
    return info
