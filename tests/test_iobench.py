"""`infinity bench io` (issue 18): the table is never cut when piped, `--json` prints JSON alone
with the median and spread of every point, and the DeepSpeed reference row uses DeepSpeed's
config defaults. One small real run on a disk directory, shared by the tests."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["bench", "io", "--size", "4MiB", "--quick"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from infinity.cli import main; sys.exit(main())"
    return subprocess.run(  # stdout is a pipe: not a TTY
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=600
    )


@pytest.fixture(scope="module")
def as_json(tmp_path_factory):
    from infinity.io.fsinfo import probe_direct_io

    path = str(tmp_path_factory.mktemp("bench"))
    if (reason := probe_direct_io(path)) is not None:
        pytest.fail(f"{path} does not support O_DIRECT ({reason})")
    out = os.path.join(path, "out.json")
    proc = _cli(*ARGS, "--dir", path, "--json", "-o", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out) as f:
        written = json.load(f)
    return json.loads(proc.stdout), written  # the whole of stdout, nothing before or after


def test_json_has_median_and_spread_per_row(as_json):
    printed, written = as_json
    assert printed == written and "machine" in printed
    assert printed["repeats"] == 3  # the default: one run is noise
    for row in printed["results"]:
        assert len(row["seconds"]) == 3
        assert row["median_s"] == sorted(row["seconds"])[1]
        assert row["min_gbps"] <= row["gbps"] <= row["max_gbps"]
        assert row["gbps"] == pytest.approx(row["nbytes"] / row["median_s"] / 1e9)
    reads = [r for r in printed["results"] if r["op"] == "read" and r["target"] == "pinned"]
    assert printed["best_read"]["gbps"] == max(r["gbps"] for r in reads)  # best by median


def test_deepspeed_row_uses_deepspeed_config_defaults(as_json):
    from infinity.io import quiet_deepspeed

    quiet_deepspeed()
    from deepspeed.runtime.swap_tensor.aio_config import get_aio_config

    defaults = get_aio_config({})  # what a DeepSpeed config without an `aio` section gets
    rows = [r for r in as_json[0]["results"] if r["system"] == "deepspeed-config-defaults"]
    assert len(rows) == 1 and rows[0]["config"] == defaults


def test_piped_table_is_not_cut(disk_dir):
    proc = _cli(*ARGS, "--dir", disk_dir, "--repeats", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "…" not in proc.stdout
    lines = proc.stdout.splitlines()
    header = lines[0].split()
    assert header[:3] == ["op", "into", "system"] and "min-max" in header
    rows = [line.split() for line in lines[1:] if line.startswith(("read ", "write "))]
    systems = {row[2] for row in rows}
    assert {"infinity", "deepspeed-config-defaults", "buffered-read"} <= systems
    assert max(len(line) for line in lines) > 80  # wider than a terminal, and left whole
