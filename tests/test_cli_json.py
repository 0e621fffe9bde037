"""Every `--json` output parses: DeepSpeed's log (its accelerator warning at import) goes to
stderr, never into the JSON on stdout (issue 18)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from infinity.cli import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=600
    )


@pytest.mark.parametrize("command", ["info", "lint", "store ls", "store fsck"])
def test_json_output_is_json_alone(command, disk_dir):
    if command == "info":
        args = ["info", "--json", "--dir", disk_dir]
    elif command.startswith("store"):
        import torch

        from infinity.store import TieredStore

        store = os.path.join(disk_dir, "store")
        with TieredStore.open(store) as s:
            s.put("w", torch.ones(1000))
        args = [*command.split(), "--json", store]
    else:
        path = os.path.join(disk_dir, "ds.json")
        with open(path, "w") as f:
            json.dump({"zero_optimization": {"stage": 3}}, f)
        args = ["lint", "--json", path]
    proc = _cli(*args)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    json.loads(proc.stdout)  # the whole of stdout, nothing before or after
    assert "Offloading to NVMe" not in proc.stdout + proc.stderr
