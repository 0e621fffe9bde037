"""The store's safety guarantees against hostile or damaged directories, racing readers, a second
writer and odd tensors (issue 19's reproductions): nothing outside the store is touched, no
reader sees a mixed or false result, no flushed key is lost, the process never dies or hangs."""

import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from store_helpers import payload, small_config

from infinity import ConfigError, IntegrityError, StorageIOError
from infinity.store import StoreLockedError, TieredStore
from infinity.store import manifest as mf

VICTIM_BYTES = b"precious user data\n" * 1000


@pytest.fixture
def victim(disk_dir):
    path = os.path.join(disk_dir, "victim")
    with open(path, "wb") as f:
        f.write(VICTIM_BYTES)
    yield path
    with open(path, "rb") as f:
        assert f.read() == VICTIM_BYTES, "a file outside the store was changed"


@pytest.fixture
def store_path(disk_dir):
    path = os.path.join(disk_dir, "store")
    with TieredStore.open(path, small_config()) as s:
        s.put("a", torch.arange(5000, dtype=torch.int32))
    return path


def _rewrite_manifest(path, change):
    doc = mf.read_manifest(path)
    change(doc)
    mf.write_atomic(path, mf.MANIFEST, mf.encode(doc))


@pytest.mark.parametrize("name", ["../victim", "ABSOLUTE", "", ".", "a/b", "x\0y", 7])
def test_manifest_file_names_outside_the_store_are_refused(store_path, victim, name):
    name = victim if name == "ABSOLUTE" else name

    def point(doc):
        doc["files"] = [name]

    _rewrite_manifest(store_path, point)
    for readonly in (False, True):
        with pytest.raises(IntegrityError, match="plain names|not a str|is a str"):
            TieredStore.open(store_path, small_config(), readonly=readonly)


@pytest.mark.parametrize("name", ["data.bin", mf.LOCK, "manifest.json.tmp", "member.json.tmp"])
def test_symlinks_in_the_store_are_never_followed(store_path, victim, name):
    if name == "member.json.tmp":  # written when a store is created: plant it in a new one
        store_path = os.path.join(os.path.dirname(store_path), "new")
        os.mkdir(store_path)
    link = os.path.join(store_path, name)
    if os.path.exists(link):
        os.unlink(link)
    os.symlink(victim, link)
    try:
        with TieredStore.open(store_path, small_config()) as s:
            s.put("b", torch.ones(3000))
            s.flush()
            s.compact()
            s.get("b")
    except StorageIOError as exc:
        assert name == "data.bin" and "symbolic link" in str(exc)
    else:
        assert name != "data.bin", "a data file that is a link was used"
        assert not os.path.islink(link)
    refused = pytest.raises(StorageIOError, match="symbolic link")
    with refused if name == "data.bin" else _nothing():
        with TieredStore.open(store_path, small_config(), readonly=True) as r:
            r.fsck()
            r.get("a" if name != "member.json.tmp" else "b")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _opens_within(path, readonly, seconds=20):
    errors = []

    def run():
        try:
            TieredStore.open(path, small_config(), readonly=readonly).close()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "opening the store hung"
    return errors


def test_manifest_fifo_or_device_is_refused_without_hanging(store_path):
    manifest = os.path.join(store_path, mf.MANIFEST)
    os.unlink(manifest)
    os.mkfifo(manifest)
    (error,) = _opens_within(store_path, readonly=True)
    assert isinstance(error, StorageIOError) and "FIFO" in str(error)
    os.unlink(manifest)
    os.symlink("/dev/zero", manifest)
    (error,) = _opens_within(store_path, readonly=False)
    assert isinstance(error, StorageIOError) and "symbolic link" in str(error)


def test_deleting_lock_does_not_let_a_second_writer_in(store_path):
    with TieredStore.open(store_path, small_config()) as a:
        os.unlink(os.path.join(store_path, mf.LOCK))
        with pytest.raises(StoreLockedError, match="this process already has it open"):
            TieredStore.open(store_path, small_config())
        a.put("k", torch.full((100,), 7.0))
        a.flush()
    with TieredStore.open(store_path, small_config(), readonly=True) as r:
        assert torch.equal(r.get("k"), torch.full((100,), 7.0))


def test_put_of_tensors_without_plain_bytes(store_path):
    with TieredStore.open(store_path, small_config()) as s:
        q = torch.quantize_per_tensor(torch.randn(10), 0.1, 0, torch.qint8)
        bad = [
            q,
            torch.empty(3, device="meta"),
            torch.eye(3).to_sparse(),
            torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
        ]
        for tensor in bad:
            with pytest.raises(ConfigError, match="no plain bytes"):
                s.put("bad", tensor)
        z = torch.randn(8, dtype=torch.complex64)
        s.put("conj", z.conj())
        s.put("neg", torch._neg_view(z))
        assert torch.equal(s.get("conj"), z.conj().resolve_conj())
        assert torch.equal(s.get("neg"), -z)
        assert "bad" not in s


@pytest.mark.parametrize("arg", ["", None, 5, b"x", "a\0b"])
def test_bad_store_paths(arg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError):
        TieredStore.open(arg, small_config())
    assert os.listdir(tmp_path) == []


def test_a_file_and_a_repeated_path_are_refused(disk_dir):
    file = os.path.join(disk_dir, "file")
    open(file, "w").close()
    with pytest.raises(StorageIOError, match="not a directory"):
        TieredStore.open(file, small_config())
    twice = os.path.join(disk_dir, "twice")
    with pytest.raises(ConfigError, match="distinct"):
        TieredStore.open([twice, twice], small_config())
    assert not os.path.exists(os.path.join(twice, mf.MANIFEST))


def test_creation_killed_before_the_first_manifest_is_done_again(disk_dir):
    a, b = os.path.join(disk_dir, "a"), os.path.join(disk_dir, "b")
    for i, path in enumerate((a, b)):  # what a kill after the member records leaves
        os.mkdir(path)
        member = {"store_id": "dead", "index": i, "count": 2}
        mf.write_atomic(path, mf.MEMBER, mf.encode(member))
    with TieredStore.open([a, b], small_config()) as s:
        s.put("x", torch.arange(10))
    with TieredStore.open([a, b], small_config(), readonly=True) as s:
        assert torch.equal(s.get("x"), torch.arange(10))


def test_a_deleted_manifest_with_data_is_not_overwritten(store_path):
    os.unlink(os.path.join(store_path, mf.MANIFEST))
    data = os.path.join(store_path, "data.bin")
    before = open(data, "rb").read()
    with pytest.raises(ConfigError, match="manifest was deleted"):
        TieredStore.open(store_path, small_config())
    assert open(data, "rb").read() == before


BAD_RECORDS = {
    "negative offset": lambda r: r["extents"][0].__setitem__(1, -4096),
    "unaligned offset": lambda r: r["extents"][0].__setitem__(1, 100),
    "file out of range": lambda r: r["extents"][0].__setitem__(0, 3),
    "huge nbytes": lambda r: r.__setitem__("nbytes", 2**45),
    "shape vs nbytes": lambda r: r.__setitem__("shape", [4999]),
    "huge shape": lambda r: r.__setitem__("shape", [10**30]),
    "string shape": lambda r: r.__setitem__("shape", "5000"),
    "missing field": lambda r: r.pop("checksum"),
    "not an object": None,
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_records_are_named_and_the_rest_works(store_path, case):
    with TieredStore.open(store_path, small_config()) as s:
        s.put("good", torch.ones(2000))

    def damage(doc):
        if BAD_RECORDS[case] is None:
            doc["entries"]["a"] = [1, 2]
        else:
            BAD_RECORDS[case](doc["entries"]["a"])

    _rewrite_manifest(store_path, damage)
    with TieredStore.open(store_path, small_config(), readonly=True) as r:
        with pytest.raises(IntegrityError, match="key 'a'"):
            r.get("a")
        assert torch.equal(r.get("good"), torch.ones(2000))
        assert set(r.fsck()) == {"a"}


def test_overlapping_extents_are_named_not_fatal(store_path):
    with TieredStore.open(store_path, small_config()) as s:
        s.put("b", torch.zeros(5000, dtype=torch.int32))

    def overlap(doc):
        doc["entries"]["b"]["extents"] = doc["entries"]["a"]["extents"]

    _rewrite_manifest(store_path, overlap)
    with TieredStore.open(store_path, small_config(), readonly=True) as r:
        problems = r.fsck()
        assert len(problems) == 1 and "overlaps" in next(iter(problems.values()))


def _versions_of(key, size):
    return {v: payload(key, v, size) for v in range(1, 400)}


@pytest.mark.parametrize("verify", [True, False])
def test_a_reader_racing_a_writer_sees_whole_committed_versions(disk_dir, verify):
    """A read-only reader (its own TieredStore, as another process would) while the writer
    re-puts the same keys and flushes, reusing freed extents: each get is one version, whole."""
    path = os.path.join(disk_dir, "race")
    size, keys = 40_000, ["k0", "k1", "k2"]
    versions = {k: _versions_of(k, size) for k in keys}
    stop, errors, reads = threading.Event(), [], [0]
    writer = TieredStore.open(path, small_config())
    for k in keys:
        writer.put(k, versions[k][1])
    writer.flush()

    def write():
        v = 1
        while not stop.is_set() and v < 399:
            v += 1
            for k in keys:
                writer.put(k, versions[k][v])
            writer.flush()

    def read(store):
        while not stop.is_set():
            for k in keys:
                try:
                    got = store.get(k)
                except Exception as exc:  # noqa: BLE001
                    errors.append(repr(exc))
                    continue
                reads[0] += 1
                if not any(torch.equal(got, want) for want in versions[k].values()):
                    errors.append(f"{k}: a value no put wrote")

    reader = TieredStore.open(path, small_config(verify_checksums=verify), readonly=True)
    threads = [threading.Thread(target=write), threading.Thread(target=read, args=(reader,))]
    threads += [threading.Thread(target=read, args=(writer,)) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(8)
    stop.set()
    for t in threads:
        t.join(120)
    reader.close()
    writer.close()
    assert reads[0] > 20
    assert errors == []


READER = """
import sys, time
sys.path.insert(0, {tests!r})
from store_helpers import small_config
from infinity.errors import InfinityError
from infinity.store import TieredStore
reads = 0
with TieredStore.open({path!r}, small_config(verify_checksums=False), readonly=True) as r:
    end = time.monotonic() + {seconds}
    while time.monotonic() < end:
        for key in ("k0", "k1", "k2"):
            try:
                reads += r.get(key).numel() > 0
            except InfinityError:
                pass
print("reads", reads)
"""


def test_compact_does_not_cut_a_file_under_a_reader_in_another_process(disk_dir):
    """A writer deleting, putting again and compacting in a loop while a read-only reader in
    another process reads: a read of extents that compact cut off (the reader one commit
    behind) was an abort of the reader (DeepSpeed's handle asserts on a read past the end of a
    file). Readers hold the files they read shared; compact leaves those alone."""
    path = os.path.join(disk_dir, "s")
    writer = TieredStore.open(path, small_config())
    for i in range(3):
        writer.put(f"k{i}", payload("k", i, 300_000))
    writer.flush()
    code = READER.format(tests=os.path.dirname(__file__), path=path, seconds=4)
    reader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    rounds = 0
    while reader.poll() is None:
        for i in range(3):
            writer.delete(f"k{i}")
        writer.compact()
        for i in range(3):
            writer.put(f"k{i}", payload("k", rounds, 300_000 + 4096 * (rounds % 5)))
        writer.compact()
        rounds += 1
    writer.close()
    out = reader.stdout.read()
    assert reader.returncode == 0, f"the reader died (status {reader.returncode})"
    assert rounds > 10 and int(out.split()[-1]) > 0, (rounds, out)
