"""TieredStore on real files: a model-based state machine, corruption, concurrency, bad input."""

import os
import shutil
import subprocess
import sys
import tempfile
import threading

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from store_helpers import small_config

from infinity import CapacityError, ConfigError, IntegrityError, StorageIOError
from infinity.store import StoreLockedError, TieredStore, UnknownKeyError
from infinity.store import manifest as mf

DTYPES = [torch.float32, torch.bfloat16, torch.int8, torch.float8_e5m2, torch.bool, torch.int64]
SHAPES = [(), (0,), (1,), (7, 3), (1000,), (33, 129), (5000,)]


def make_tensor(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(
        0, 256, (torch.empty(shape, dtype=dtype).nbytes,), dtype=torch.uint8, generator=g
    )
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(
            a.contiguous().reshape(-1).view(torch.uint8),
            b.contiguous().reshape(-1).view(torch.uint8),
        )
    )


def new_dir() -> str:
    return tempfile.mkdtemp(prefix="infinity-store-", dir=os.environ.get("INFINITY_TEST_DIR"))


class StoreMachine(RuleBasedStateMachine):
    """Random put/get/evict/delete/flush/reopen against a dict."""

    def __init__(self):
        super().__init__()
        self.root = new_dir()
        self.paths = [os.path.join(self.root, "a"), os.path.join(self.root, "b")]
        self.config = small_config(pinned_bytes=64 * 1024)
        self.store = TieredStore.open(self.paths, self.config)
        self.model: dict[str, torch.Tensor] = {}

    keys = st.sampled_from([f"k{i}" for i in range(6)])

    @rule(
        key=keys,
        dtype=st.sampled_from(DTYPES),
        shape=st.sampled_from(SHAPES),
        seed=st.integers(0, 2**20),
        tier=st.sampled_from(["nvme", "cpu"]),
    )
    def put(self, key, dtype, shape, seed, tier):
        t = make_tensor(dtype, shape, seed)
        if tier == "cpu" and t.nbytes > self.config.pinned_bytes:
            with pytest.raises(CapacityError):
                self.store.put(key, t, tier=tier)
            return
        self.store.put(key, t, tier=tier)
        self.model[key] = t.clone()

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def get(self, data):
        key = data.draw(st.sampled_from(sorted(self.model)))
        assert same(self.store.get(key), self.model[key])

    @rule(key=keys)
    def get_missing_or_present(self, key):
        if key in self.model:
            assert same(self.store.get(key), self.model[key])
        else:
            with pytest.raises(UnknownKeyError):
                self.store.get(key)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def prefetch_then_evict(self, data):
        keys = data.draw(st.lists(st.sampled_from(sorted(self.model)), min_size=1, max_size=3))
        fits = [k for k in keys if self.model[k].nbytes <= self.config.pinned_bytes]
        if fits:
            assert self.store.prefetch(fits, tier="cpu").result() == len(set(fits))
            assert "cpu" in self.store.entry(fits[-1]).tiers
            self.store.evict(fits[-1], tier="cpu")
            assert "cpu" not in self.store.entry(fits[-1]).tiers

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data):
        key = data.draw(st.sampled_from(sorted(self.model)))
        self.store.delete(key)
        del self.model[key]
        assert key not in self.store

    @rule()
    def flush(self):
        self.store.flush()

    @rule()
    def reopen(self):
        self.store.close()
        self.store = TieredStore.open(self.paths, self.config)

    @invariant()
    def consistent(self):
        assert sorted(self.store.keys()) == sorted(self.model)
        stats = self.store.stats()
        assert stats.pinned_bytes <= self.config.pinned_bytes
        assert stats.nvme_bytes == sum(t.nbytes for t in self.model.values())

    def teardown(self):
        self.store.close()
        reopened = TieredStore.open(self.paths, self.config, readonly=True)
        try:
            for key, value in self.model.items():
                assert same(reopened.get(key), value)
        finally:
            reopened.close()
        shutil.rmtree(self.root, ignore_errors=True)


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)


@pytest.fixture
def store_dir(disk_dir):
    return os.path.join(disk_dir, "store")


def test_freed_extents_are_reused(store_dir):
    with TieredStore.open(store_dir, small_config()) as s:
        for i in range(5):
            s.put("w", torch.full((100_000,), i, dtype=torch.uint8))
            s.flush()
        size = os.path.getsize(os.path.join(store_dir, "data.bin"))
    # two generations may be live at once (old until commit, new); never five
    assert size <= 2 * 102_400


def test_corruption_is_detected(store_dir):
    t = torch.randn(10_000)
    with TieredStore.open(store_dir, small_config()) as s:
        s.put("w", t)
        ext = s._entries["w"].extents[0]
    data = os.path.join(store_dir, "data.bin")
    with open(data, "r+b") as f:
        f.seek(ext.file_offset + 1234)
        byte = f.read(1)
        f.seek(ext.file_offset + 1234)
        f.write(bytes([byte[0] ^ 0x40]))
    with TieredStore.open(store_dir, small_config()) as s:
        with pytest.raises(IntegrityError, match=r"key 'w'.*data\.bin"):
            s.get("w")
        s.put("ok", t)
        with pytest.raises(IntegrityError, match=r"key 'w'"):  # a prefetch reports it too
            s.prefetch(["ok", "w"], tier="cpu").result()
        assert "cpu" in s.entry("ok").tiers and "cpu" not in s.entry("w").tiers
        out = torch.empty(2 * 40_000, dtype=torch.uint8)
        with pytest.raises(IntegrityError, match=r"key 'w'"):  # and a read into our buffers
            s.pread(["ok", "w"], [out[:40_000], out[40_000:]]).result()
    with TieredStore.open(store_dir, small_config(verify_checksums=False)) as s:
        assert not torch.equal(s.get("w"), t)  # switched off: the damaged bytes come back


def test_pread_fills_the_callers_buffers_and_leaves_the_tiers_alone(store_dir):
    a, b = torch.randn(3000), torch.arange(5000, dtype=torch.int16).reshape(50, 100)
    with TieredStore.open(store_dir, small_config()) as s:
        s.put("a", a)
        s.put("b", b)
        s.evict("a")
        s.evict("b")
        out_a, out_b = torch.empty(3000), torch.empty(50, 100, dtype=torch.int16)
        assert s.pread(["a", "b"], [out_a, out_b]).result() == 2
        assert torch.equal(out_a, a) and torch.equal(out_b, b)
        assert "cpu" not in s.entry("a").tiers and "cpu" not in s.entry("b").tiers
        with pytest.raises(ConfigError, match=r"'a' \(12000 bytes\).*got 11996 bytes"):
            s.pread(["a"], [torch.empty(2999)])
        with pytest.raises(ValueError):  # one buffer per key
            s.pread(["a", "b"], [out_a])


def test_concurrent_get_and_prefetch(store_dir):
    tensors = {f"k{i}": torch.randn(3000 + 100 * i) for i in range(16)}
    with TieredStore.open(store_dir, small_config(pinned_bytes=64 * 1024)) as s:
        for k, t in tensors.items():
            s.put(k, t)
        errors = []

        def worker(seed):
            g = torch.Generator().manual_seed(seed)
            try:
                for _ in range(30):
                    k = f"k{int(torch.randint(0, 16, (1,), generator=g))}"
                    if seed % 2:
                        s.prefetch([k], tier="cpu").result()
                    assert torch.equal(s.get(k), tensors[k]), k
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        stats = s.stats()
        assert stats.pinned_bytes <= 64 * 1024 and stats.hits["cpu"] + stats.misses["cpu"] > 0


def test_mru_keeps_a_subset_under_cyclic_scans(store_dir):
    """10 equal tensors, room for 4: LRU would miss every time; MRU keeps ~4 resident."""
    with TieredStore.open(store_dir, small_config(pinned_bytes=4 * 8192)) as s:
        for i in range(10):
            s.put(f"l{i}", torch.full((8192,), i, dtype=torch.uint8))
        for _ in range(4):
            for i in range(10):
                s.prefetch([f"l{i}"], tier="cpu").result()
        hits = s.stats().hits["cpu"]
    assert hits >= 3 * 3  # after the first scan, >= 3 of 10 hit per scan


# -- bad input ----------------------------------------------------------------------------------
def test_unknown_key_and_bad_arguments(store_dir):
    with TieredStore.open(store_dir, small_config()) as s:
        with pytest.raises(KeyError, match="no key 'nope'.*0 keys"):
            s.get("nope")
        s.put("a", torch.ones(3))
        with pytest.raises(ConfigError, match="is not a device"):
            s.get("a", device="gpu0")
        with pytest.raises(ConfigError, match="not supported"):
            s.get("a", device="meta")
        if not torch.cuda.is_available():
            with pytest.raises(ConfigError, match="no CUDA device"):
                s.get("a", device="cuda:0")
        with pytest.raises(ConfigError, match="tier must be one of"):
            s.put("b", torch.ones(3), tier="disk")
        with pytest.raises(ConfigError, match="non-empty strings"):
            s.put("", torch.ones(3))
        with pytest.raises(CapacityError, match="exceeds the whole cpu tier"):
            s.put("big", torch.ones(1_000_000), tier="cpu")
        assert "big" not in s and sorted(s.keys()) == ["a"]


def test_missing_parent_directory(tmp_path):
    with pytest.raises(StorageIOError, match="does not exist"):
        TieredStore.open(tmp_path / "no" / "such", small_config())


def test_tmpfs_refused():
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    path = tempfile.mkdtemp(dir="/dev/shm")
    try:
        with pytest.raises(StorageIOError, match="tmpfs: memory, not a disk"):
            TieredStore.open(path, small_config())
    finally:
        shutil.rmtree(path)


def test_newer_format_version_refused(store_dir):
    with TieredStore.open(store_dir, small_config()) as s:
        s.put("a", torch.ones(3))
    doc = mf.read_manifest(store_dir)
    doc["version"] = mf.FORMAT_VERSION + 1
    mf.write_atomic(store_dir, mf.MANIFEST, mf.encode(doc))
    with pytest.raises(ConfigError, match="newer infinity.*upgrade"):
        TieredStore.open(store_dir, small_config())


def test_damaged_manifest_refused(store_dir):
    with TieredStore.open(store_dir, small_config()) as s:
        s.put("a", torch.ones(3))
    path = os.path.join(store_dir, mf.MANIFEST)
    raw = bytearray(open(path, "rb").read())
    raw[40] ^= 1
    open(path, "wb").write(bytes(raw))
    with pytest.raises(IntegrityError, match="manifest.json"):
        TieredStore.open(store_dir, small_config())


def test_paths_in_the_wrong_order(disk_dir):
    a, b = os.path.join(disk_dir, "a"), os.path.join(disk_dir, "b")
    with TieredStore.open([a, b], small_config()) as s:
        s.put("x", torch.ones(100_000))
    with pytest.raises(ConfigError, match="order the store was created with"):
        TieredStore.open([b, a], small_config())
    with pytest.raises(ConfigError, match="spans 2 paths; 1 were given"):
        TieredStore.open([a], small_config())


def test_one_writer_many_readers(store_dir):
    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from store_helpers import small_config\n"
        "from infinity.store import TieredStore, StoreLockedError\n"
        f"try:\n    TieredStore.open({store_dir!r}, small_config())\n"
        "except StoreLockedError as exc:\n    print('LOCKED', exc); sys.exit(0)\n"
        "sys.exit('second writer was not refused')\n"
    )
    with TieredStore.open(store_dir, small_config()) as s:
        s.put("a", torch.arange(10))
        s.flush()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"pid {os.getpid()}" in proc.stdout
        with TieredStore.open(store_dir, small_config(), readonly=True) as reader:
            assert torch.equal(reader.get("a"), torch.arange(10))
            with pytest.raises(ConfigError, match="read-only"):
                reader.put("b", torch.ones(1))
    with pytest.raises(StoreLockedError):
        with TieredStore.open(store_dir, small_config()):
            TieredStore.open(store_dir, small_config())


def test_disk_full_leaves_the_store_consistent(small_fs):
    path = os.path.join(small_fs, "store")
    with TieredStore.open(path, small_config()) as s:
        kept = torch.randn(1_000_000)  # 4 MB
        s.put("kept", kept)
        s.flush()
        with pytest.raises(StorageIOError, match="disk full") as info:
            s.put("huge", torch.ones(100_000_000, dtype=torch.uint8))  # 100 MB on a 64 MB disk
        assert info.value.errno == 28
        assert "huge" not in s
        data = os.path.join(path, "data.bin")  # pieces that were written are given back too
        assert os.stat(data).st_blocks * 512 < 16 << 20
        assert torch.equal(s.get("kept"), kept)
        s.put("small", torch.ones(10))  # the failed extents went back to the free space
    with TieredStore.open(path, small_config()) as s:
        assert sorted(s.keys()) == ["kept", "small"] and torch.equal(s.get("kept"), kept)


def test_golden_manifest_bytes():
    """The on-disk encoding is a format: changing it must be deliberate."""
    doc = {
        "format": mf.FORMAT,
        "version": 1,
        "store_id": "0" * 32,
        "generation": 3,
        "files": ["data.bin"],
        "entries": {
            "w": {
                "dtype": "bfloat16",
                "shape": [2, 3],
                "nbytes": 12,
                "extents": [[0, 0, 12]],
                "checksum": "xxh3-64:0",
                "version": 1,
            }
        },
    }
    assert mf.encode(doc) == GOLDEN


GOLDEN = (
    b'{"body": "{\\"entries\\":{\\"w\\":{\\"checksum\\":\\"xxh3-64:0\\",\\"dtype\\":\\"bfloat16'
    b'\\",\\"extents\\":[[0,0,12]],\\"nbytes\\":12,\\"shape\\":[2,3],\\"version\\":1}},\\"files'
    b'\\":[\\"data.bin\\"],\\"format\\":\\"infinity-store\\",\\"generation\\":3,\\"store_id\\":'
    b'\\"00000000000000000000000000000000\\",\\"version\\":1}", '
    b'"checksum": "xxh3-64:0b67e16a327227c2"}\n'
)


def test_striped_multi_chunk_tensor_and_damage_in_a_split_chunk(disk_dir):
    """40 MiB over two paths: the extents meet inside checksum chunk 1, so that chunk arrives in
    two pieces from two files; damage in the second file is found."""
    paths = [os.path.join(disk_dir, "a"), os.path.join(disk_dir, "b")]
    t = torch.randint(0, 256, ((40 << 20) + 5,), dtype=torch.uint8)
    with TieredStore.open(paths, small_config(pinned_bytes=64 << 20)) as s:
        s.put("w", t)
        extents = s._entries["w"].extents
        assert [e.file for e in extents] == [0, 1] and 16 << 20 < extents[0].nbytes < 32 << 20
        assert torch.equal(s.get("w"), t)
        s.prefetch("w", tier="cpu").result()
        assert torch.equal(s.get("w"), t)
        second = extents[1]
    with open(os.path.join(paths[1], "data.bin"), "r+b") as f:
        f.seek(second.file_offset + 3)
        byte = f.read(1)
        f.seek(second.file_offset + 3)
        f.write(bytes([byte[0] ^ 1]))
    with TieredStore.open(paths, small_config(pinned_bytes=64 << 20)) as s:
        with pytest.raises(IntegrityError, match=r"key 'w'.*b/data\.bin"):
            s.get("w")


def test_cli_fsck_and_compact(store_dir):
    from click.testing import CliRunner

    from infinity.cli import main

    with TieredStore.open(store_dir, small_config()) as s:
        s.put("a", torch.randn(50_000))
        s.put("b", torch.randn(50_000))
        s.put("c", torch.randn(50_000))
        s.flush()
        s.delete("c")
        s.flush()
        ext = s._entries["b"].extents[0]
    runner = CliRunner()
    ok = runner.invoke(main, ["store", "fsck", store_dir])
    assert ok.exit_code == 0 and "2 of 2 keys intact" in ok.output
    listing = runner.invoke(main, ["store", "ls", store_dir])
    head, first = listing.output.splitlines()[:2]  # a header names the columns
    assert head.split() == ["key", "dtype", "shape", "size", "version"], listing.output
    assert first.split() == ["a", "float32", "[50000]", "195.31", "KiB", "1"], listing.output
    assert "2 keys" in listing.output
    size = os.path.getsize(os.path.join(store_dir, "data.bin"))
    compact = runner.invoke(main, ["store", "compact", store_dir])
    assert compact.exit_code == 0, compact.output
    assert os.path.getsize(os.path.join(store_dir, "data.bin")) < size
    with open(os.path.join(store_dir, "data.bin"), "r+b") as f:
        f.seek(ext.file_offset + 10)
        f.write(b"\xff\xfe")
    bad = runner.invoke(main, ["store", "fsck", store_dir])
    assert bad.exit_code == 1 and "DAMAGED b" in bad.output and "1 of 2 keys intact" in bad.output
