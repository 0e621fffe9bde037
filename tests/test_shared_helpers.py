"""Helpers written once and shared by the package and bench/ (issue 18): the size parser, the
page-cache drop, the mount lookup and the GPU name of a result file."""

import os

import pytest

from infinity import parse_size
from infinity.io.fsinfo import mount_of
from infinity.iobench import drop_page_cache

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture
def bench_modules(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import _measure
    import _report

    return _measure, _report


def test_bench_parses_sizes_with_the_package_parser(bench_modules):
    measure, _ = bench_modules
    assert measure.parse_size is parse_size
    assert measure.parse_size("4G") == 4 * 10**9  # decimal, as "4GB"
    assert measure.parse_size("4Gi") == measure.parse_size("4GiB") == 4 << 30
    assert measure.parse_size("2.5GiB") == 5 << 29 and measure.parse_size(4096) == 4096


def test_drop_page_cache_fadvises_every_file_when_not_root(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    files = [tmp_path / "a.bin", tmp_path / "sub" / "b.bin", tmp_path / "c.bin"]
    for f in files:
        f.write_bytes(b"x" * 8192)
    advised = []
    real_open, real_fadvise = open, os.posix_fadvise

    def no_proc(path, *args, **kwargs):
        if str(path) == "/proc/sys/vm/drop_caches":
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    def record(fd, offset, length, advice):
        advised.append((os.readlink(f"/proc/self/fd/{fd}"), advice))
        real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr("builtins.open", no_proc)
    monkeypatch.setattr(os, "posix_fadvise", record)
    # a directory (walked) and a file named alone
    assert drop_page_cache([tmp_path / "sub", str(tmp_path / "a.bin")]) == "fadvise"
    assert sorted(advised) == sorted((str(f), os.POSIX_FADV_DONTNEED) for f in files[:2])


def test_drop_page_cache_as_root_drops_everything(tmp_path, monkeypatch):
    """Root: the whole page cache through /proc (faked here: a test must not empty the
    machine's cache under other processes), and no per-file work."""
    (tmp_path / "a.bin").write_bytes(b"x")
    wrote, real_open = [], open

    class Proc:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            wrote.append(text)

    def fake(path, *args, **kwargs):
        if str(path) == "/proc/sys/vm/drop_caches":
            return Proc()
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake)
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: pytest.fail("fadvise after a drop"))
    assert drop_page_cache([tmp_path]) == "drop_caches" and wrote == ["3\n"]


def _reference_mount_of(path: str) -> tuple[str, str, str]:
    """/proc/self/mounts read by hand: the last of the longest mount points holding path."""
    real, best = os.path.realpath(path), ("/", "unknown", "")
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            source, point, fstype = line.split()[:3]
            point = point.replace("\\040", " ")
            if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(
                best[0]
            ):
                best = (point, fstype, "" if source == "none" else source)
    return best


@pytest.mark.parametrize("where", ["tmp", "root", "proc", "dev-shm", "sys"])
def test_mount_of_matches_the_mount_table(tmp_path, where):
    path = {"tmp": str(tmp_path), "root": "/", "proc": "/proc/self", "dev-shm": "/dev/shm",
            "sys": "/sys/kernel"}[where]  # fmt: skip
    if not os.path.exists(path):
        pytest.skip(f"{path} does not exist here")
    point, fstype, device = mount_of(path)
    ref_point, ref_type, ref_device = _reference_mount_of(path)
    assert (point, fstype) == (ref_point, ref_type)
    if ref_device not in ("/dev/root", "rootfs"):  # psutil finds the real device of those
        assert device == ref_device
    if where == "proc":
        assert (point, fstype) == ("/proc", "proc")


def test_gpu_name_makes_no_cuda_context_and_falls_back(bench_modules, monkeypatch):
    _, report = bench_modules
    import torch

    if torch.cuda.is_initialized():
        pytest.skip("CUDA is initialised in this process already (an earlier GPU test)")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: pytest.fail("CUDA touched"))
    monkeypatch.setattr(report, "_nvml_name", lambda: None)
    monkeypatch.setattr(report, "_nvidia_smi_name", lambda: "NVIDIA H100 80GB HBM3")
    assert report.gpu_name() == "H100-80GB-HBM3"
    monkeypatch.setattr(report, "_nvidia_smi_name", lambda: None)
    assert report.gpu_name() == "cpu"
    monkeypatch.setattr(report, "_nvml_name", lambda: "NVIDIA H200")
    assert report.gpu_name() == "H200"
    assert not torch.cuda.is_initialized()
