"""Property tests: random byte mutations and random headers thrown at convert's safetensors
reading. A tiny random Llama checkpoint is built once; each example rewrites a fresh copy of its
one shard. Whatever the bytes, only InfinityError subclasses come out (at the CLI: exit 2 and
one line, or a click usage error), within a deadline, and nothing outside the example's own
temporary directories changes. What the header reader accepts, the safetensors library accepts
too, with the same tensors and the same bytes (it is at least as strict as the reference)."""

import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from store_helpers import small_config
from test_badinput_cli import Hang, deadline

from infinity.cli import run
from infinity.errors import ConfigError, InfinityError, IntegrityError
from infinity.files import open_regular
from infinity.inference import convert
from infinity.inference.checkpoint import read_safetensors_header, read_tensor
from infinity.inference.convert import plan_layout
from infinity.inference.layout import ModelLayout

SHARD = "model.safetensors"
SETTINGS = dict(
    deadline=None, suppress_health_check=list(HealthCheck), database=None, print_blob=True
)
DTYPES = "F64 F32 F16 BF16 F8_E4M3 F8_E5M2 I64 I32 I16 I8 U8 BOOL".split()
OTHER_DTYPES = ["C64", "F8_E8M0", "U16", "U64", "F4", "", "f16"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """(checkpoint directory, the shard's bytes, its header, its data) of a tiny fp16 Llama."""
    import transformers

    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, vocab_size=64,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float16)
    path = tmp_path_factory.mktemp("fuzz") / "hf"
    model.save_pretrained(path)
    raw = (path / SHARD).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return str(path), raw, json.loads(raw[8 : 8 + n]), raw[8 + n :]


def digest(root: str) -> dict[str, str]:
    """Every path under ``root`` (links not followed) -> what it is and a hash of its bytes."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.islink(path) or not os.path.isfile(path):
                found[os.path.relpath(path, root)] = "dir" if os.path.isdir(path) else "other"
                continue
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return found


# -- strategies -----------------------------------------------------------------------------------
def mutations(raw: bytes):
    """Byte-level damage: set, insert or delete bytes (mostly in and near the header), cut the
    file, append to it, rewrite the header length."""
    header_end = 8 + int.from_bytes(raw[:8], "little")
    where = st.one_of(st.integers(0, header_end + 16), st.integers(0, len(raw) - 1))
    op = st.one_of(
        st.tuples(st.just("set"), where, st.integers(0, 255)),
        st.tuples(st.just("insert"), where, st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("delete"), where, st.integers(1, 64)),
        st.tuples(st.just("cut"), st.integers(0, len(raw))),
        st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("length"), st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 4096))),
    )
    return st.lists(op, min_size=1, max_size=4).map(lambda ops: mutate(raw, ops))


def mutate(raw: bytes, ops) -> bytes:
    data = bytearray(raw)
    for op in ops:
        if op[0] == "set" and op[1] < len(data):
            data[op[1]] = op[2]
        elif op[0] == "insert":
            data[op[1] : op[1]] = op[2]
        elif op[0] == "delete":
            del data[op[1] : op[1] + op[2]]
        elif op[0] == "cut":
            del data[op[1] :]
        elif op[0] == "append":
            data += op[1]
        elif op[0] == "length":
            data[:8] = op[1].to_bytes(8, "little")
    return bytes(data)


JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),  # fmt: skip
    max_leaves=8,
)


@st.composite
def headers(draw, header: dict, data: bytes) -> bytes:
    """A header that is the real one with a few fields changed, serialized with a length that
    is right or not, followed by the real data, cut or extended."""
    header = copy.deepcopy(header)
    names = [k for k in header if k != "__metadata__"]
    count = st.integers(-2, 300)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        field = draw(st.sampled_from(["dtype", "shape", "offsets", "entry", "drop", "add", "meta"]))
        entry = header.setdefault(name, {})
        if not isinstance(entry, dict):
            continue
        if field == "dtype":
            entry["dtype"] = draw(st.sampled_from(DTYPES + OTHER_DTYPES) | JUNK)
        elif field == "shape":
            entry["shape"] = draw(st.lists(count, max_size=4) | JUNK)
        elif field == "offsets":
            entry["data_offsets"] = draw(
                st.lists(st.integers(-4, len(data) + 64), min_size=2, max_size=2)
                | st.lists(st.integers(0, 2**66), min_size=0, max_size=3)
                | JUNK
            )
        elif field == "entry":
            header[name] = draw(JUNK)
        elif field == "drop":
            header.pop(name)
        elif field == "add":
            header[draw(st.text(max_size=8))] = draw(
                st.fixed_dictionaries(
                    {"dtype": st.sampled_from(DTYPES), "shape": st.lists(count, max_size=3),
                     "data_offsets": st.lists(st.integers(0, len(data)), min_size=2, max_size=2)}
                ) | JUNK
            )  # fmt: skip
        else:
            header["__metadata__"] = draw(JUNK)
    body = json.dumps(header).encode() + b" " * draw(st.integers(0, 8))
    length = draw(st.just(len(body)) | st.integers(0, 2**64 - 1) | st.integers(0, len(body) + 64))
    size = draw(st.just(len(data)) | st.integers(0, len(data) + 64))
    return length.to_bytes(8, "little") + body + data[:size] + bytes(max(0, size - len(data)))


SAME_SIZE = {"F16": ["BF16", "I16"], "BF16": ["F16", "I16"], "F32": ["I32"]}


@st.composite
def relaid(draw, header: dict, data: bytes) -> bytes:
    """The same tensors laid out anew: in another order in the data (offsets recomputed), the
    header's keys in another order, padded, with metadata. Valid, unless a change makes it not:
    a tensor's bytes changed, its dtype swapped for one of the same size, its shape transposed
    (the checkpoint no longer matches its config), an empty tensor added, or a tensor sharing
    the bytes of another of its size (an overlap, the rest of the file consistent)."""
    names = [k for k in header if k != "__metadata__"]
    old = {n: data[slice(*header[n]["data_offsets"])] for n in names}
    entries = {n: dict(header[n]) for n in names}
    aliases: dict[str, str] = {}
    for i in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(names))
        change = draw(st.sampled_from(["bytes", "dtype", "transpose", "empty", "alias"]))
        if change == "bytes" and old[name]:
            at = draw(st.integers(0, len(old[name]) - 1))
            old[name] = old[name][:at] + bytes([draw(st.integers(0, 255))]) + old[name][at + 1 :]
        elif change == "dtype" and entries[name]["dtype"] in SAME_SIZE:
            entries[name]["dtype"] = draw(st.sampled_from(SAME_SIZE[entries[name]["dtype"]]))
        elif change == "transpose":
            entries[name]["shape"] = entries[name]["shape"][::-1]
        elif change == "empty":
            names.append(f"extra.{i}")
            entries[f"extra.{i}"], old[f"extra.{i}"] = {"dtype": "F16", "shape": [0, 3]}, b""
        elif change == "alias":
            same = [n for n in names if n != name and len(old[n]) == len(old[name])]
            if same and name not in aliases.values():
                aliases[name] = draw(st.sampled_from(same))
    layout, offset, body = {}, 0, b""
    for name in draw(st.permutations(names)):
        if name not in aliases:
            layout[name] = entries[name] | {"data_offsets": [offset, offset + len(old[name])]}
            offset += len(old[name])
            body += old[name]
    for name, target in aliases.items():
        target = aliases.get(target, target)
        layout[name] = entries[name] | {"data_offsets": layout[target]["data_offsets"]}
    doc = {n: layout[n] for n in draw(st.permutations(names))}
    if draw(st.booleans()):
        doc = {"__metadata__": draw(st.dictionaries(st.text(max_size=6), st.text(max_size=6),
                                                    max_size=2))} | doc  # fmt: skip
    text = json.dumps(doc).encode() + b" " * draw(st.integers(0, 8))
    return len(text).to_bytes(8, "little") + text + body


class Shard(bytes):
    """A shard's bytes with a short repr (a failing example prints its start, not 30 KB)."""

    def __repr__(self) -> str:
        return f"Shard({len(self)} bytes: {bytes(self[:160])!r}...)"


def shards(pristine):
    _, raw, header, data = pristine
    random_header = st.binary(max_size=200).map(lambda b: len(b).to_bytes(8, "little") + b + data)
    strategies = (mutations(raw), headers(header, data), random_header, relaid(header, data))
    return st.one_of(*strategies).map(Shard)


# -- the example runner ---------------------------------------------------------------------------
class Example:
    """A fresh temporary root per example holding a copy of the checkpoint (with the shard
    replaced) and room for a store; on exit, the pristine checkpoint must be unchanged and the
    root hold nothing but what the example made inside it."""

    def __init__(self, pristine, shard: bytes):
        self.pristine, self.shard = pristine[0], shard
        self.before = digest(self.pristine)

    def __enter__(self):
        self.parent = os.path.dirname(self.pristine)
        self.siblings = sorted(os.listdir(self.parent))
        self.root = tempfile.mkdtemp(prefix="infinity-fuzz-", dir=self.parent)
        self.hf = os.path.join(self.root, "hf")
        shutil.copytree(self.pristine, self.hf)
        with open(os.path.join(self.hf, SHARD), "wb") as f:
            f.write(self.shard)
        self.store = os.path.join(self.root, "store")
        return self

    def __exit__(self, *exc):
        try:
            if exc[0] is None:
                assert digest(self.pristine) == self.before, "the pristine checkpoint changed"
                assert set(os.listdir(self.root)) <= {"hf", "store"}, os.listdir(self.root)
                hf = digest(self.hf)
                assert set(hf) == set(digest(self.pristine)), "files added to the checkpoint"
                assert hf[SHARD] == hashlib.sha256(self.shard).hexdigest()
        finally:
            shutil.rmtree(self.root)
        assert sorted(os.listdir(self.parent)) == self.siblings, "written beside the example"


def check_error(exc: BaseException, shard_path: str) -> None:
    """Only InfinityError subclasses; one line; a damaged shard is named."""
    if isinstance(exc, Hang | AssertionError) or not isinstance(exc, InfinityError):
        raise exc
    assert "\n" not in str(exc), str(exc)
    if isinstance(exc, IntegrityError) or "which infinity does not convert" in str(exc):
        assert shard_path in str(exc), str(exc)


def agrees_with_safetensors(path: str, sources) -> None:
    """What we accepted, the reference reader accepts, with the same tensors and bytes."""
    with safe_open(path, framework="pt") as f:
        assert sorted(f.keys()) == sorted(s.name for s in sources)
        fd = open_regular(path)
        try:
            for src in sources:
                theirs = f.get_tensor(src.name)
                ours = read_tensor(fd, src)
                assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, src.name
                assert ours.view(torch.uint8).flatten().tolist() == theirs.view(
                    torch.uint8
                ).flatten().tolist(), src.name  # fmt: skip
        finally:
            os.close(fd)


# -- the properties -------------------------------------------------------------------------------
def test_header_reader_and_plan(pristine):
    """300 shards through read_safetensors_header and plan_layout (convert's reading, up to the
    first byte written)."""

    @settings(max_examples=300, **SETTINGS)
    @given(shard=shards(pristine))
    def check(shard):
        with Example(pristine, shard) as ex, deadline(20):
            path = os.path.join(ex.hf, SHARD)
            try:
                sources = read_safetensors_header(path)
            except BaseException as exc:  # noqa: B036 - Hang and assertions are re-raised
                check_error(exc, path)
                return
            agrees_with_safetensors(path, sources)
            try:
                plan_layout(ex.hf)
            except BaseException as exc:  # noqa: B036
                check_error(exc, path)

    check()


def test_convert(pristine):
    """60 shards through the whole conversion: refused before anything is written, or
    converted to a complete store."""

    @settings(max_examples=60, **SETTINGS)
    @given(shard=shards(pristine))
    def check(shard):
        with Example(pristine, shard) as ex, deadline(30):
            try:
                layout = convert(ex.hf, ex.store, store_config=small_config(pinned_bytes=0))
            except BaseException as exc:  # noqa: B036
                check_error(exc, os.path.join(ex.hf, SHARD))
                if os.path.exists(ex.store):  # never left as if valid
                    with pytest.raises(ConfigError, match="run `infinity convert"):
                        ModelLayout.load(ex.store)
                return
            assert layout.complete and ModelLayout.load(ex.store) == layout

    check()


def test_cli_convert(pristine, capsys):
    """20 shards through `infinity convert`: exit 0, or exit 2 with one line (a click usage
    error, if any, has its own format and exit 2)."""

    @settings(max_examples=20, **SETTINGS)
    @given(shard=shards(pristine))
    def check(shard):
        with Example(pristine, shard) as ex, deadline(30):
            argv = sys.argv
            sys.argv = ["infinity", "convert", ex.hf, ex.store]
            try:
                run()
                code = 0
            except SystemExit as exited:
                code = exited.code
            finally:
                sys.argv = argv
            out = capsys.readouterr()
            assert code in (0, 2), (code, out.err[-2000:])
            if code == 2 and not out.err.startswith("Usage:"):
                assert out.err.startswith("error: ") and len(out.err.strip().splitlines()) == 1
                assert "Traceback" not in out.err

    check()
