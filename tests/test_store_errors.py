"""Bad calls, bad configs, odd paths, a read-only filesystem, a full disk and a close racing a
get (issue 19): each is one InfinityError subclass with a message that says what to do, never a
traceback from deep inside, and the store keeps its state."""

import contextlib
import errno
import os
import shutil
import subprocess
import threading

import pytest
import torch
from store_helpers import payload, small_config

from infinity import (
    CapacityError,
    ConfigError,
    InfinityError,
    IntegrityError,
    StorageIOError,
)
from infinity.store import StoreConfig, TieredStore
from infinity.store import manifest as mf


@pytest.fixture
def store_path(disk_dir):
    path = os.path.join(disk_dir, "store")
    with TieredStore.open(path, small_config()) as s:
        s.put("a", torch.arange(1000))
    return path


def test_bad_calls_are_config_errors_and_change_nothing(store_path):
    buf = torch.empty(8000, dtype=torch.uint8)
    with TieredStore.open(store_path, small_config()) as s:
        calls = {
            "get a list": lambda: s.get(["a"]),
            "get an int": lambda: s.get(3),
            "pread lengths": lambda: s.pread(["a", "a"], [buf]),
            "pread no buffers": lambda: s.pread(["a"], []),
            "pread None": lambda: s.pread(None, None),
            "pread a str": lambda: s.pread("a", [buf]),
            "pread one tensor": lambda: s.pread(["a"], buf),
            "pread a list key": lambda: s.pread([["a"]], [buf]),
            "pwrite lengths": lambda: s.pwrite(["a"], []),
            "pwrite a str": lambda: s.pwrite("ab", [torch.ones(1), torch.ones(1)]),
            "pwrite one tensor": lambda: s.pwrite(["a"], torch.ones(1, 1000)),
            "pwrite None": lambda: s.pwrite(None, None),
            "prefetch a list key": lambda: s.prefetch([["a"]]),
            "prefetch None": lambda: s.prefetch(None),
            "prefetch tier list": lambda: s.prefetch("a", tier=["cpu"]),
            "put a list key": lambda: s.put(["a"], torch.ones(1)),
            "put a list": lambda: s.put("b", [1, 2, 3]),
            "put tier list": lambda: s.put("b", torch.ones(1), tier=["cpu"]),
            "evict a list": lambda: s.evict(["a"]),
            "evict tier list": lambda: s.evict("a", tier=["cpu"]),
            "delete a list": lambda: s.delete(["a"]),
            "entry a list": lambda: s.entry(["a"]),
            "get device list": lambda: s.get("a", device=["cpu"]),
        }
        for name, call in calls.items():
            with pytest.raises(ConfigError) as info:
                call()
            assert "Traceback" not in str(info.value), name
        assert ["a"] not in s and None not in s and "a" in s
        assert sorted(s.keys()) == ["a"] and torch.equal(s.get("a"), torch.arange(1000))


def test_odd_tensors_are_refused_or_stored_resolved(store_path):
    """The put side of test_store_safety's odd tensors: every layout and device that has no
    plain bytes is a ConfigError; conjugate and negative views are stored resolved."""
    with TieredStore.open(store_path, small_config()) as s:
        odd = {
            "meta": torch.empty(3, device="meta"),
            "sparse coo": torch.eye(3).to_sparse(),
            "sparse csr": torch.eye(3).to_sparse_csr(),
            "nested": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
        }
        for name, tensor in odd.items():
            with pytest.raises(ConfigError, match="no plain bytes"):
                s.put(name, tensor)
        with pytest.raises(ConfigError, match="expects a torch.Tensor"):
            s.put("numpy", torch.ones(3).numpy())
        z = torch.randn(6, dtype=torch.complex64)
        s.put("conj", z.conj())
        s.put("neg", torch._neg_view(z))
        s.put("strided", torch.arange(20).reshape(4, 5).t()[1:, ::2])
        assert torch.equal(s.get("conj"), z.conj().resolve_conj())
        assert torch.equal(s.get("neg"), -z)
        assert torch.equal(s.get("strided"), torch.arange(20).reshape(4, 5).t()[1:, ::2])
        assert not set(odd) & set(s.keys())


@pytest.mark.parametrize("readonly", [False, True])
def test_paths_that_are_not_store_directories(disk_dir, readonly):
    file = os.path.join(disk_dir, "file")
    with open(file, "w") as f:
        f.write("not a store")
    cases = [
        (file, StorageIOError),
        ("/proc", StorageIOError),
        ("/proc/self/status", StorageIOError),
        ("/sys", StorageIOError),
        ("/dev/null", StorageIOError),
        ("", ConfigError),
        (None, ConfigError),
        (7, ConfigError),
        (b"/tmp", ConfigError),
        (os.path.join(disk_dir, "a\0b"), ConfigError),
        ([file, None], ConfigError),
    ]
    for path, kind in cases:
        with pytest.raises(kind):
            TieredStore.open(path, small_config(), readonly=readonly)
    with pytest.raises(StorageIOError, match="kernel interface, not storage"):
        TieredStore.open("/proc", small_config(), readonly=readonly)
    with open(file) as f:
        assert f.read() == "not a store"
    assert sorted(os.listdir(disk_dir)) == ["file"]


@pytest.fixture
def read_only_mount(disk_dir):
    """A read-only bind mount of a directory that holds a store (needs root and mount)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root and mount(8) for a read-only bind mount")
    source, target = os.path.join(disk_dir, "rw"), os.path.join(disk_dir, "ro")
    os.mkdir(source)
    os.mkdir(target)
    with TieredStore.open(os.path.join(source, "store"), small_config()) as s:
        s.put("a", torch.arange(1000))
    bind = subprocess.run(["mount", "--bind", source, target], capture_output=True, text=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bind.stderr.strip()}")
    try:
        ro = ["mount", "-o", "remount,ro,bind", target]
        remount = subprocess.run(ro, capture_output=True, text=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {remount.stderr.strip()}")
        yield target
    finally:
        subprocess.run(["umount", target], check=False)


def test_writer_on_a_read_only_filesystem(read_only_mount):
    store = os.path.join(read_only_mount, "store")
    for path in (store, os.path.join(read_only_mount, "new")):
        with pytest.raises(StorageIOError, match="mounted read-only.*readonly=True") as info:
            TieredStore.open(path, small_config())
        assert info.value.errno == errno.EROFS
    with TieredStore.open(store, small_config(), readonly=True) as r:
        assert torch.equal(r.get("a"), torch.arange(1000)) and r.fsck() == {}


@pytest.mark.parametrize(
    "field, value",
    [
        ("aio", "x"),
        ("aio", {"lanes": 0}),
        ("aio", {"block_size_bytes": 2**62}),
        ("aio", {"single_submit": "no"}),
        ("pinned_bytes", "1e99"),
        ("pinned_bytes", 2**70),
        ("pinned_bytes", "1e400"),
        ("pinned_bytes", float("nan")),
        pytest.param("gpu_bytes", -(10**5000), id="gpu_bytes--10**5000"),
        pytest.param("gpu_bytes", 10**5000, id="gpu_bytes-10**5000"),
        ("stripe_min_bytes", 2**70),
        ("verify_checksums", "no"),
        ("verify_checksums", 1),
        ("verify_checksums", None),
        ("io_threads", True),
        ("io_threads", 10**9),
    ],
)
def test_store_config_values_are_config_errors(field, value):
    with pytest.raises(ConfigError, match=field if field != "aio" or value == "x" else "Aio"):
        StoreConfig(**{field: value})


@pytest.mark.parametrize(
    "raw, expected", [("0", False), ("1", True), ("true", True), ("no", False), ("YES", True)]
)
def test_verify_checksums_from_the_environment(monkeypatch, raw, expected):
    monkeypatch.setenv("INFINITY_VERIFY_CHECKSUMS", raw)
    assert StoreConfig().verify_checksums is expected


def test_a_bad_environment_value_is_a_config_error(monkeypatch):
    monkeypatch.setenv("INFINITY_VERIFY_CHECKSUMS", "maybe")
    with pytest.raises(ConfigError, match="INFINITY_VERIFY_CHECKSUMS.*1/0"):
        StoreConfig()
    monkeypatch.delenv("INFINITY_VERIFY_CHECKSUMS")
    monkeypatch.setenv("INFINITY_PINNED_BYTES", "1e99")
    with pytest.raises(ConfigError, match="pinned_bytes"):
        StoreConfig()


def test_more_pinned_memory_than_the_machine_has_is_a_capacity_error(disk_dir):
    with pytest.raises(CapacityError, match="pinned_bytes"):
        TieredStore.open(disk_dir, small_config(pinned_bytes=1 << 49))
    assert not os.path.exists(os.path.join(disk_dir, mf.MANIFEST)) or mf.read_manifest(disk_dir)
    with TieredStore.open(disk_dir, small_config()) as s:  # nothing was left locked
        s.put("a", torch.ones(3))


def test_close_while_another_thread_reads(store_path):
    """Each get either returns the whole value or raises InfinityError: never another error,
    never a crash (close waits for the reads in flight before it frees their buffers)."""
    value = payload("big", 1, 6 << 20)
    for pinned in (0, 16 << 20):
        s = TieredStore.open(store_path, small_config(pinned_bytes=pinned))
        s.put("big", value, tier="cpu" if pinned else "nvme")
        results, started = [], threading.Event()

        def read(store=s, results=results, started=started):
            while True:
                try:
                    got = store.get("big")
                except InfinityError as exc:
                    results.append(exc)
                    return
                except BaseException as exc:  # noqa: BLE001
                    results.append(exc)
                    return
                results.append(torch.equal(got, value))
                started.set()

        threads = [threading.Thread(target=read) for _ in range(3)]
        for t in threads:
            t.start()
        assert started.wait(60)
        s.close()
        for t in threads:
            t.join(60)
            assert not t.is_alive()
        errors = [r for r in results if not isinstance(r, bool)]
        assert len(errors) == 3 and all(isinstance(e, InfinityError) for e in errors), errors
        assert all("is closed" in str(e) for e in errors)
        assert all(r for r in results if isinstance(r, bool))
        with pytest.raises(InfinityError, match="is closed"):
            s.get("big")


def test_close_waits_for_pwrites_in_flight_and_commits_them(store_path):
    with TieredStore.open(store_path, small_config()) as s:
        s.put("k", payload("k", 1, 3 << 20))
        s.flush()
        s.pwrite(["k"], [payload("k", 2, 3 << 20)])  # in place, not awaited
    with TieredStore.open(store_path, small_config(), readonly=True) as r:
        assert torch.equal(r.get("k"), payload("k", 2, 3 << 20))


def fill_disk(directory: str) -> str:
    """Fill the filesystem of ``directory`` to its last block (root's reserve included)."""
    path, block = os.path.join(directory, "filler"), os.statvfs(directory).f_bsize
    with open(path, "ab", buffering=0) as f:
        for size in (1 << 20, block, block):  # the last round: what delayed allocation let by
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\xaa" * size)
                    if size == block:
                        os.fsync(f.fileno())
    probe = os.path.join(directory, "probe")
    with pytest.raises(OSError), open(probe, "wb", buffering=0) as f:  # not one block more
        f.write(b"x")
        os.fsync(f.fileno())
    os.unlink(probe)
    return path


def free_disk(filler: str) -> None:
    os.unlink(filler)
    os.sync()  # ext4 reuses freed blocks once the journal has committed their release


def test_disk_full_at_flush_keeps_the_store_working(small_fs):
    path = os.path.join(small_fs, "store")
    with TieredStore.open(path, small_config()) as s:
        s.put("kept", payload("kept", 1, 1 << 20))
        s.flush()
        s.put("new", payload("new", 1, 1 << 20))
        filler = fill_disk(small_fs)
        with pytest.raises(StorageIOError, match=r"disk full.*free on .*free space") as info:
            s.flush()
        assert info.value.errno == errno.ENOSPC
        assert not os.path.exists(os.path.join(path, mf.MANIFEST + ".tmp"))
        assert sorted(mf.read_manifest(path)["entries"]) == ["kept"]  # the last commit
        assert torch.equal(s.get("new"), payload("new", 1, 1 << 20))  # still here
        free_disk(filler)
        s.flush()  # now it commits
    with TieredStore.open(path, small_config(), readonly=True) as r:
        assert sorted(r.keys()) == ["kept", "new"] and r.fsck() == {}


def test_disk_full_at_close_keeps_the_last_commit(small_fs):
    path = os.path.join(small_fs, "store")
    s = TieredStore.open(path, small_config())
    s.put("kept", payload("kept", 1, 1 << 20))
    s.flush()
    s.put("lost", payload("lost", 1, 1 << 20))
    filler = fill_disk(small_fs)
    with pytest.raises(StorageIOError, match="disk full") as info:
        s.close()
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(InfinityError, match="is closed"):
        s.get("kept")
    free_disk(filler)
    with TieredStore.open(path, small_config()) as s:  # the lock was released
        assert sorted(s.keys()) == ["kept"]
        assert torch.equal(s.get("kept"), payload("kept", 1, 1 << 20))


def test_disk_full_at_creation_leaves_a_store_that_can_be_made_later(small_fs):
    path = os.path.join(small_fs, "store")
    os.mkdir(path)
    with open(os.path.join(path, mf.LOCK), "w") as f:
        f.write("1\n")  # an earlier attempt's; its block is reused
    filler = fill_disk(small_fs)
    with pytest.raises(StorageIOError, match="disk full") as info:
        TieredStore.open(path, small_config())
    assert info.value.errno == errno.ENOSPC
    assert not os.path.exists(os.path.join(path, mf.MANIFEST))
    free_disk(filler)
    with TieredStore.open(path, small_config()) as s:
        s.put("a", torch.ones(3))
    with TieredStore.open(path, small_config(), readonly=True) as r:
        assert torch.equal(r.get("a"), torch.ones(3))


def _rewrite_manifest(path, change):
    doc = mf.read_manifest(path)
    change(doc)
    mf.write_atomic(path, mf.MANIFEST, mf.encode(doc))


def _set_top(field, value):
    return lambda doc: doc.__setitem__(field, value)


TOP_LEVEL = {  # damage to the manifest as a whole: opening it fails, naming the file
    "body not an object": (None, IntegrityError),
    "missing version": (lambda doc: doc.pop("version"), IntegrityError),
    "version a string": (_set_top("version", "1"), IntegrityError),
    "version a float": (_set_top("version", 1.0), IntegrityError),
    "version null": (_set_top("version", None), IntegrityError),
    "version true": (_set_top("version", True), IntegrityError),
    "version 0": (_set_top("version", 0), IntegrityError),
    "version newer": (_set_top("version", mf.FORMAT_VERSION + 1), ConfigError),
    "missing format": (lambda doc: doc.pop("format"), ConfigError),
    "missing files": (lambda doc: doc.pop("files"), IntegrityError),
    "missing entries": (lambda doc: doc.pop("entries"), IntegrityError),
    "missing generation": (lambda doc: doc.pop("generation"), IntegrityError),
    "missing store_id": (lambda doc: doc.pop("store_id"), IntegrityError),
    "entries a list": (_set_top("entries", []), IntegrityError),
    "generation negative": (_set_top("generation", -1), IntegrityError),
    "files a manifest name": (_set_top("files", ["manifest.json"]), IntegrityError),
}


@pytest.mark.parametrize("case", sorted(TOP_LEVEL))
def test_a_damaged_manifest_is_one_error_naming_it(store_path, case):
    change, kind = TOP_LEVEL[case]
    if change is None:
        raw = mf.encode(["a", "list"])  # a valid checksum over a body that is not an object
        with open(os.path.join(store_path, mf.MANIFEST), "wb") as f:
            f.write(raw)
    else:
        _rewrite_manifest(store_path, change)
    for readonly in (True, False):
        with pytest.raises(kind, match="manifest.json"):
            TieredStore.open(store_path, small_config(), readonly=readonly)


RECORDS = {  # damage to one record: that key is named, the rest of the store works
    "version a string": lambda r: r.__setitem__("version", "1"),
    "version a float": lambda r: r.__setitem__("version", 1.5),
    "version null": lambda r: r.__setitem__("version", None),
    "version true": lambda r: r.__setitem__("version", True),
    "version a list": lambda r: r.__setitem__("version", [1]),
    "version negative": lambda r: r.__setitem__("version", -1),
    "shape one element short": lambda r: r.__setitem__("shape", [999]),
    "nbytes one element more": lambda r: r.__setitem__("nbytes", r["nbytes"] + 8),
    "dtype of another size": lambda r: r.__setitem__("dtype", "int32"),
    "dtype unknown": lambda r: r.__setitem__("dtype", "float7"),
    "checksum a number": lambda r: r.__setitem__("checksum", 5),
    "extent a dict": lambda r: r.__setitem__("extents", [{"file": 0}]),
    "extent nbytes short": lambda r: r["extents"][0].__setitem__(2, 4096),
    "missing dtype": lambda r: r.pop("dtype"),
    "missing extents": lambda r: r.pop("extents"),
    "missing version": lambda r: r.pop("version"),
}


@pytest.mark.parametrize("case", sorted(RECORDS))
def test_a_bad_record_is_named_and_fsck_still_runs(store_path, case):
    with TieredStore.open(store_path, small_config()) as s:
        s.put("good", torch.ones(2000))
    _rewrite_manifest(store_path, lambda doc: RECORDS[case](doc["entries"]["a"]))
    with TieredStore.open(store_path, small_config(), readonly=True) as r:
        with pytest.raises(IntegrityError, match="key 'a'"):
            r.get("a")
        assert sorted(r.keys()) == ["good"] and set(r.damaged()) == {"a"}
        assert set(r.fsck()) == {"a"} and torch.equal(r.get("good"), torch.ones(2000))


@pytest.mark.parametrize("shift", [0, 4096])
def test_overlapping_extents_of_two_valid_records(store_path, shift):
    """Two records, each valid alone, whose extents overlap (wholly or in part): the first
    keeps them, the second is named; its bytes are never read as the first key's."""
    with TieredStore.open(store_path, small_config()) as s:
        s.put("b", torch.zeros(1000, dtype=torch.int64))  # the same size as "a"

    def overlap(doc):
        (file, offset, nbytes), *_ = doc["entries"]["a"]["extents"]
        doc["entries"]["b"]["extents"] = [[file, offset + shift, nbytes]]

    _rewrite_manifest(store_path, overlap)
    with TieredStore.open(store_path, small_config(), readonly=True) as r:
        (bad,) = r.damaged()
        good = ({"a", "b"} - {bad}).pop()
        assert "overlaps another key's extents" in r.damaged()[bad]
        assert set(r.fsck()) == {bad} and r.keys() == [good]
        with pytest.raises(IntegrityError, match=f"key '{bad}'.*fsck"):
            r.get(bad)


def _cli(monkeypatch, capsys, *args):
    import sys

    from infinity.cli import run

    monkeypatch.setattr(sys, "argv", ["infinity", *args])
    with pytest.raises(SystemExit) as exited:
        run()
    out = capsys.readouterr()
    return exited.value.code, out.out + out.err


def test_cli_fsck_names_bad_records_and_exits_nonzero(store_path, monkeypatch, capsys):
    with TieredStore.open(store_path, small_config()) as s:
        s.put("good", torch.ones(2000))
    _rewrite_manifest(store_path, lambda doc: doc["entries"]["a"].__setitem__("shape", [3]))
    code, out = _cli(monkeypatch, capsys, "store", "fsck", store_path)
    assert code == 1 and "DAMAGED a: manifest record of key 'a' is invalid" in out, out
    assert "Traceback" not in out


@pytest.mark.parametrize("command", ["ls", "fsck", "compact"])
def test_cli_on_a_damaged_manifest_is_one_line(store_path, monkeypatch, capsys, command):
    _rewrite_manifest(store_path, lambda doc: doc.pop("generation"))
    code, out = _cli(monkeypatch, capsys, "store", command, store_path)
    assert code == 2 and out.startswith("error: ") and "lacks the field" in out, out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1


def test_cli_ls_names_bad_records_and_exits_nonzero(store_path, monkeypatch, capsys):
    _rewrite_manifest(store_path, lambda doc: doc["entries"]["a"].__setitem__("shape", [3]))
    code, out = _cli(monkeypatch, capsys, "store", "ls", store_path)
    assert code == 1 and "key 'a'" in out, out
