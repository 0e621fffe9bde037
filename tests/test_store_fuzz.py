"""Property tests: random bytes, random JSON and random names thrown at a store's files and at
the manifest decoder. A real two-path store is built once; each example damages a fresh copy
of it. Whatever its files hold, only InfinityError subclasses come out, within a deadline (the
call runs in a thread joined with a timeout), no file outside the example's store directories
changes (a sibling "victim" file is compared byte for byte and by mtime, with a link to it
planted in the store), and what the decoder accepts is a record that cannot point a read
anywhere wrong (aligned extents inside the address space that add up to the tensor)."""

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import threading
import traceback

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from store_helpers import SMALL_AIO, small_config

from infinity.config import ALIGNMENT_BYTES
from infinity.errors import InfinityError
from infinity.store import TieredStore
from infinity.store import manifest as mf

SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None)
TIMEOUT_S = 20  # per call; a healthy one takes well under a second
# one handle thread a lane: closing a store costs DeepSpeed a thread join per handle thread
CONFIG = dataclasses.replace(
    small_config(), aio=dataclasses.replace(SMALL_AIO, intra_op_parallelism=1)
)
VICTIM = b"precious user data\n" * 200
TENSORS = {
    "w": torch.arange(6000, dtype=torch.float32).reshape(60, 100),  # striped over both paths
    "b": torch.arange(7, dtype=torch.bfloat16),
    "i": torch.tensor([1, -2, 3], dtype=torch.int64),
    "flag": torch.tensor([True, False]),
    "empty": torch.empty(0, 3),
    "scalar": torch.tensor(2.5),
}
DTYPE_NAMES = sorted(n for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """{relative path: bytes} of a real two-path store, and its manifest document."""
    root = str(tmp_path_factory.mktemp("pristine"))
    paths = [os.path.join(root, "s0"), os.path.join(root, "s1")]
    with TieredStore.open(paths, CONFIG) as s:
        for key, tensor in TENSORS.items():
            s.put(key, tensor)
        s.delete("i")  # a hole in the space map
        s.put("i", TENSORS["i"])
    files = {}
    for path in paths:
        for name in os.listdir(path):
            with open(os.path.join(path, name), "rb") as f:
                files[os.path.join(os.path.basename(path), name)] = f.read()
    return files, mf.read_manifest(paths[0])


# -- strategies -----------------------------------------------------------------------------------
INTS = st.one_of(
    st.integers(-5, 10_000),
    st.sampled_from([4096, 4095, 8192, 1 << 50, (1 << 50) + 1, 2**63, 2**64, -(2**63), 10**30]),
)
SCALARS = st.one_of(
    st.none(), st.booleans(), INTS, st.floats(), st.text(max_size=12), st.sampled_from(DTYPE_NAMES)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
NAMES = st.one_of(  # file names a tampered manifest may give
    st.sampled_from(
        ["data.bin", "evil", "fifo", "dir", "../victim", "VICTIM", "manifest.json", "member.json",
         "LOCK", "inplace.json", "data.bin.tmp", "", ".", "..", "a/b", "x\0y", "\ud800", "é" * 200,
         "n" * 256, "new.bin"]
    ),
    st.text(min_size=1, max_size=20),
)  # fmt: skip
TOP_FIELDS = ["format", "version", "store_id", "generation", "files", "entries", "other"]
RECORD_FIELDS = ["dtype", "shape", "nbytes", "extents", "checksum", "version", "other"]
RECORD_OPS = ["rec", "del_rec", "record", "extent", "share", "rename", "retype", "reshape"]


@st.composite
def damaged_docs(draw, doc):
    """``doc`` with a few random changes, from small (one extent moved) to wild (a field of
    random JSON)."""
    doc = json.loads(json.dumps(doc))
    keys = sorted(doc["entries"])
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["top", "del_top", "files"] + 2 * RECORD_OPS))
        entries = doc.get("entries") if isinstance(doc.get("entries"), dict) else {}
        recs = [k for k in keys if isinstance(entries.get(k), dict)]
        if op == "top":
            doc[draw(st.sampled_from(TOP_FIELDS))] = draw(JSON)
        elif op == "del_top":
            doc.pop(draw(st.sampled_from(TOP_FIELDS)), None)
        elif op == "files":
            doc["files"] = draw(st.lists(NAMES, min_size=1, max_size=3))
        elif not recs:
            continue
        elif op == "rec":
            entries[draw(st.sampled_from(recs))][draw(st.sampled_from(RECORD_FIELDS))] = draw(JSON)
        elif op == "del_rec":
            entries[draw(st.sampled_from(recs))].pop(draw(st.sampled_from(RECORD_FIELDS)), None)
        elif op == "record":
            entries[draw(st.sampled_from(recs + ["new"]))] = draw(JSON)
        elif op == "extent":
            extents = entries[draw(st.sampled_from(recs))].get("extents")
            if isinstance(extents, list) and extents and isinstance(extents[0], list):
                ext = extents[draw(st.integers(0, len(extents) - 1))]
                if ext:
                    ext[draw(st.integers(0, len(ext) - 1))] = draw(INTS)
        elif op == "share":  # another key's extents: overlap between two valid records
            a, b = draw(st.sampled_from(recs)), draw(st.sampled_from(recs))
            entries[b]["extents"] = entries[a].get("extents")
            if draw(st.booleans()):
                entries[b]["nbytes"] = entries[a].get("nbytes")
                entries[b]["shape"] = entries[a].get("shape")
                entries[b]["dtype"] = entries[a].get("dtype")
        elif op == "rename":
            entries[draw(st.text(max_size=10))] = entries.pop(draw(st.sampled_from(recs)))
        elif op == "retype":  # a dtype of the same size: still a valid record
            rec = entries[draw(st.sampled_from(recs))]
            rec["dtype"] = draw(st.sampled_from(DTYPE_NAMES))
        elif op == "reshape":
            rec = entries[draw(st.sampled_from(recs))]
            rec["shape"] = draw(st.lists(st.integers(0, 70), max_size=3))
    return doc


@st.composite
def manifest_bytes(draw, pristine):
    """The bytes of a manifest: a damaged document with a valid checksum, or the real file with
    bytes flipped, cut or inserted, or random bytes."""
    files, doc = pristine
    kind = draw(st.sampled_from(["doc"] * 4 + ["bytes", "random", "json"]))
    if kind == "doc":
        return mf.encode(draw(damaged_docs(doc)))
    if kind == "json":
        return mf.encode(draw(JSON))
    if kind == "random":
        return draw(st.binary(max_size=300))
    raw = bytearray(files[os.path.join("s0", mf.MANIFEST)])
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(raw)))
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip" and at < len(raw):
            raw[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del raw[at:]
        else:
            raw[at:at] = draw(st.binary(min_size=1, max_size=4))
    return bytes(raw)


# -- running one example --------------------------------------------------------------------------
def within(fn, *args):
    """``fn(*args)`` in a thread: (value, None) or (None, exception); fails if it hangs."""
    out = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(TIMEOUT_S)
    assert not thread.is_alive(), f"{fn.__name__} still running after {TIMEOUT_S} s"
    return out.get("value"), out.get("error")


def only_infinity_errors(error) -> None:
    if error is not None and not isinstance(error, InfinityError):
        trace = "".join(traceback.format_exception(error))
        raise AssertionError(f"not an InfinityError:\n{trace}")


class Example:
    """A temporary directory holding a copy of the pristine store (s0, s1), a victim file next
    to it, and in s0 a link to the victim, a FIFO and a directory that a manifest may name."""

    def __init__(self, files):
        self.root = tempfile.mkdtemp(prefix="store-fuzz-", dir=os.environ.get("INFINITY_TEST_DIR"))
        self.paths = [os.path.join(self.root, "s0"), os.path.join(self.root, "s1")]
        for path in self.paths:
            os.mkdir(path)
        for name, data in files.items():
            with open(os.path.join(self.root, name), "wb") as f:
                f.write(data)
        self.victim = os.path.join(self.root, "victim")
        with open(self.victim, "wb") as f:
            f.write(VICTIM)
        os.symlink(self.victim, os.path.join(self.paths[0], "evil"))
        os.mkfifo(os.path.join(self.paths[0], "fifo"))
        os.mkdir(os.path.join(self.paths[0], "dir"))
        self.before = self.outside()

    def outside(self):
        """What lies outside the store directories: names, and the victim's bytes and mtime."""
        st_ = os.stat(self.victim)
        with open(self.victim, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        return sorted(os.listdir(self.root)), digest, st_.st_mtime_ns, st_.st_size

    def write(self, relative: str, raw: bytes) -> None:
        with open(os.path.join(self.root, relative), "wb") as f:
            f.write(raw)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            if exc[0] is None:
                assert self.outside() == self.before, "a file outside the store changed"
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
        return False


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def read_everything(paths):
    """Open read-only, read every key (the damaged ones too), fsck, close; what was read back
    has its record's dtype and shape, and a key whose record is intact reads as it was put."""
    with TieredStore.open(paths, CONFIG, readonly=True) as r:
        for key in sorted(set(r.keys()) | set(r.damaged()) | set(TENSORS)):
            try:
                got = r.get(key)
            except InfinityError:
                continue
            info = r.entry(key)
            assert got.dtype == info.dtype and tuple(got.shape) == info.shape
            assert got.untyped_storage().nbytes() >= info.nbytes
            original = TENSORS.get(key)
            if original is not None and (got.dtype, got.shape) == (original.dtype, original.shape):
                assert torch.equal(raw_bytes(got), raw_bytes(original)), key
        problems = r.fsck()
        assert set(r.damaged()) <= set(problems)
        return problems


def write_something(paths):
    """Open for writing, put, delete, flush, compact and close."""
    with TieredStore.open(paths, CONFIG) as s:
        s.put("fresh", torch.arange(3000, dtype=torch.int16))
        for key in list(s.keys())[:1]:
            s.delete(key)
        s.flush()
        s.compact()
        assert torch.equal(s.get("fresh"), torch.arange(3000, dtype=torch.int16))
    with TieredStore.open(paths, CONFIG, readonly=True) as r:
        assert torch.equal(r.get("fresh"), torch.arange(3000, dtype=torch.int16))


# -- the properties -------------------------------------------------------------------------------
def test_decoder_accepts_only_records_that_point_nowhere_wrong(pristine):
    """500 manifests and records through decode and Entry.from_record (no files)."""
    files, doc = pristine
    keys = st.one_of(st.sampled_from(sorted(doc["entries"])), st.text(max_size=10))

    @settings(max_examples=500, **SETTINGS)
    @given(raw=manifest_bytes(pristine), key=keys, record=JSON, file_count=st.integers(0, 3))
    def check(raw, key, record, file_count):
        try:
            decoded = mf.decode(raw, "manifest.json")
        except InfinityError:
            decoded = None
        if decoded is not None:
            assert isinstance(decoded["entries"], dict) and isinstance(decoded["files"], list)
            records = list(decoded["entries"].items())
        else:
            records = []
        for name, rec in records + [(key, record)]:
            try:
                entry = mf.Entry.from_record(name, rec, file_count)
            except InfinityError as exc:
                assert "manifest record of key" in str(exc)
                continue
            except BaseException as exc:  # noqa: BLE001
                only_infinity_errors(exc)
            assert entry.nbytes == math.prod(entry.shape) * entry.dtype.itemsize
            assert sum(e.nbytes for e in entry.extents) == entry.nbytes
            for ext in entry.extents:
                assert 0 <= ext.file < file_count and ext.file_offset % ALIGNMENT_BYTES == 0
                assert 0 <= ext.file_offset and ext.file_offset + ext.nbytes <= 1 << 50

    check()


def test_tampered_stores_open_read_and_write_safely(pristine):
    """120 damaged copies of a store (manifest, member records, in-place record) opened
    read-only (every key read, fsck) and then for writing (put, delete, flush, compact)."""
    files, doc = pristine
    sidecar = st.one_of(
        st.none(),
        st.tuples(st.sampled_from([os.path.join("s1", mf.MEMBER), os.path.join("s0", mf.INPLACE)]),
                  st.one_of(JSON.map(mf.encode), st.binary(max_size=64),
                            st.builds(lambda keys, g, n: mf.encode(
                                          {"generation": g, "keys": keys, "settled": keys[:n]}),
                                      st.lists(st.sampled_from(sorted(TENSORS)), max_size=3),
                                      st.integers(0, 3), st.integers(0, 2)))),
    )  # fmt: skip

    @settings(max_examples=120, **SETTINGS)
    @given(raw=manifest_bytes(pristine), extra=sidecar)
    def check(raw, extra):
        with Example(files) as ex:
            ex.write(os.path.join("s0", mf.MANIFEST), raw)
            if extra is not None:
                ex.write(*extra)
            _, error = within(read_everything, ex.paths)
            only_infinity_errors(error)
            event(f"read: {type(error).__name__ if error else 'opened'}")
            _, error = within(write_something, ex.paths)
            only_infinity_errors(error)
            event(f"write: {type(error).__name__ if error else 'opened'}")

    check()


def test_random_store_directory_names(tmp_path):
    """80 random directory names (absolute paths are not generated: a user may name any
    directory): a store is made inside the base directory, or one InfinityError."""
    base = tmp_path / "base"
    base.mkdir()
    names = st.one_of(
        st.text(st.characters(blacklist_characters="/"), min_size=0, max_size=40),
        st.sampled_from(["a/b", "x\0y", "\ud800", "n" * 300, "é" * 130, " ", "-", "~"]),
    ).filter(lambda n: n not in (".", ".."))

    @settings(max_examples=80, **SETTINGS)
    @given(name=names, readonly=st.booleans())
    def check(name, readonly):
        before = sorted(os.listdir(tmp_path))

        def run():
            with TieredStore.open(os.path.join(base, name), CONFIG, readonly=readonly) as s:
                s.put("k", torch.ones(10))

        _, error = within(run)
        only_infinity_errors(error)
        assert sorted(os.listdir(tmp_path)) == before
        for entry in os.listdir(base):
            shutil.rmtree(base / entry, ignore_errors=True)

    check()
