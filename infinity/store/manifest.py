"""On-disk format of a store: one manifest (JSON) committed atomically, one record per tensor.

Layout of a store over paths P0..Pn-1 (one per drive):
    P0/manifest.json     the committed state (this module)
    P0/LOCK              held (flock) by the one writer process
    Pi/member.json       {"store_id", "index", "count"}: which store and which stripe this path is
    Pi/<file>            data file named in the manifest's "files" (aligned extents)

Commit protocol: write manifest.json.tmp, fsync it, rename over manifest.json, fsync the
directory. Data extents are copy-on-write: a put never overwrites an extent that the committed
manifest references, and freed extents are reused only after a commit that no longer names them,
so a crash at any instant leaves the old or the new state of every key.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from infinity.config import ALIGNMENT_BYTES
from infinity.errors import ConfigError, IntegrityError
from infinity.store._files import check_name, io_error, read_file

FORMAT = "infinity-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MEMBER = "member.json"
LOCK = "LOCK"
INPLACE = "inplace.json"  # keys rewritten in place since the manifest's generation


def checksum_bytes(data) -> str:
    """xxh3-64 of a buffer (bytes, memoryview, numpy array, CPU uint8 tensor): the manifest's own
    checksum (tensor data uses checksum.py)."""
    if isinstance(data, torch.Tensor):
        data = data.numpy() if data.numel() else b""
    return "xxh3-64:" + xxhash.xxh3_64_hexdigest(data)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(
            f"manifest names dtype {_short(name)}, which this torch {torch.__version__} lacks"
        )
    return dtype


@dataclass(frozen=True)
class Extent:
    """``nbytes`` of a tensor's bytes at ``file_offset`` of the data file on path ``file``."""

    file: int
    file_offset: int
    nbytes: int


@dataclass
class Entry:
    """Everything about one tensor: its persisted record and its runtime residency."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    extents: list[Extent]
    checksum: str
    version: int
    # runtime, never persisted
    cpu: torch.Tensor | None = field(default=None, repr=False, compare=False)
    gpu: torch.Tensor | None = field(default=None, repr=False, compare=False)
    gpu_ready: Any = field(default=None, repr=False, compare=False)  # torch.cuda.Event
    last_used: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    busy: int = field(default=0, repr=False, compare=False)  # readers of the cpu copy
    retired: bool = field(default=False, repr=False, compare=False)  # replaced or deleted
    loading: bool = field(default=False, repr=False, compare=False)  # a pinned load in flight
    readers: int = field(default=0, repr=False, compare=False)  # reads that use the extents
    free_unread: bool = field(default=False, repr=False, compare=False)  # free at last reader
    writing: bool = field(default=False, repr=False, compare=False)  # an in-place write runs
    suspect: bool = field(default=False, repr=False, compare=False)  # may be torn: always verify

    @property
    def tiers(self) -> tuple[str, ...]:
        return tuple(t for t, c in (("gpu", self.gpu), ("cpu", self.cpu)) if c is not None) + (
            "nvme",
        )

    def to_record(self) -> dict[str, Any]:
        return {
            "dtype": dtype_name(self.dtype),
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "extents": [[e.file, e.file_offset, e.nbytes] for e in self.extents],
            "checksum": self.checksum,
            "version": self.version,
        }

    @classmethod
    def from_record(cls, key: str, rec: Any, file_count: int) -> Entry:
        """The entry a manifest record describes; IntegrityError naming the key and the problem
        when the record cannot be right (so that no read follows a wrong extent)."""
        try:
            return cls._parse(key, rec, file_count)
        except (IntegrityError, KeyError, TypeError, ValueError, OverflowError) as exc:
            problem = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            prefix = f"manifest record of key {_short(key)} is invalid: "
            raise IntegrityError(
                problem if problem.startswith(prefix) else prefix + problem
            ) from None

    @classmethod
    def _parse(cls, key: str, rec: Any, file_count: int) -> Entry:
        def bad(problem: str) -> IntegrityError:
            return IntegrityError(f"manifest record of key {_short(key)} is invalid: {problem}")

        if not isinstance(key, str) or not key:
            raise bad("a key is a non-empty string")
        if not isinstance(rec, dict):
            raise bad(f"a record is an object, got {type(rec).__name__}")
        dtype = dtype_from_name(_typed(rec["dtype"], str, "dtype"))
        shape = tuple(_count(d, "shape") for d in _typed(rec["shape"], list, "shape"))
        nbytes = _count(rec["nbytes"], "nbytes")
        numel = math.prod(shape)
        if numel * dtype.itemsize != nbytes:
            raise bad(
                f"shape {list(shape)} of {dtype_name(dtype)} is {numel * dtype.itemsize} "
                f"bytes, the record says {nbytes}"
            )
        extents = []
        for item in _typed(rec["extents"], list, "extents"):
            if not isinstance(item, list) or len(item) != 3:
                raise bad(f"an extent is [file, offset, nbytes], got {_short(item)}")
            file, offset, size = (_count(v, "extent") for v in item)
            if file >= file_count:
                raise bad(f"extent in file {file}, but the store has {file_count} files")
            if offset % ALIGNMENT_BYTES or offset + size > MAX_FILE_BYTES:
                raise bad(f"extent at offset {offset} is unaligned or past {MAX_FILE_BYTES}")
            extents.append(Extent(file, offset, size))
        if sum(e.nbytes for e in extents) != nbytes:
            raise bad(f"extents hold {sum(e.nbytes for e in extents)} bytes, the record {nbytes}")
        checksum = _typed(rec["checksum"], str, "checksum")
        return cls(key, dtype, shape, nbytes, extents, checksum, _count(rec["version"], "version"))


MAX_FILE_BYTES = 1 << 50  # the extents' address space (extents.py)


def _typed(value, kind: type, what: str):
    if not isinstance(value, kind):
        raise IntegrityError(f"{what} is a {kind.__name__}, got {type(value).__name__}")
    return value


def _count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_FILE_BYTES:
        raise IntegrityError(f"{what} value {_short(value)} is not an integer in [0, 2**50]")
    return value


def check_doc(doc: Any, path: str) -> dict[str, Any]:
    """The manifest's own fields are what this version writes; its files plain names."""
    if not isinstance(doc, dict):
        raise IntegrityError(f"{path}: the manifest body is not an object")
    try:
        files = _typed(doc["files"], list, "files")
        _typed(doc["entries"], dict, "entries")
        _count(doc["generation"], "generation")
        _typed(doc["store_id"], str, "store_id")
    except KeyError as exc:
        raise IntegrityError(f"{path}: the manifest lacks the field {exc}") from None
    except IntegrityError as exc:
        raise IntegrityError(f"{path}: {exc}") from None
    for name in files:
        check_name(name, path)
    return doc


def encode(doc: dict[str, Any]) -> bytes:
    """Canonical JSON plus a checksum of itself, so that a damaged manifest is detected."""
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return json.dumps({"body": body, "checksum": checksum_bytes(body.encode())}).encode() + b"\n"


def decode_body(raw: bytes, path: str) -> Any:
    """The checked body of a file written with ``encode``."""
    try:
        outer = json.loads(raw)
        body, stored = outer["body"], outer["checksum"]
        if not isinstance(body, str) or not isinstance(stored, str):
            raise TypeError("body and checksum are strings")
        actual = checksum_bytes(body.encode())
        if actual != stored:
            raise IntegrityError(f"{path} is damaged: checksum {actual}, recorded {stored}")
        return json.loads(body)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise IntegrityError(f"{path} is not a valid infinity store file ({exc})") from None


def decode(raw: bytes, path: str) -> dict[str, Any]:
    doc = decode_body(raw, path)
    if not isinstance(doc, dict):
        raise IntegrityError(f"{path}: the manifest body is not an object")
    if doc.get("format") != FORMAT:
        raise ConfigError(
            f"{path} is not an infinity store manifest (format {_short(doc.get('format'))})"
        )
    if "version" not in doc:
        raise IntegrityError(f"{path}: the manifest lacks the field 'version'")
    version = doc["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise IntegrityError(
            f"{path}: format version {_short(version)} is not an integer >= 1: the manifest is "
            "damaged or was tampered with"
        )
    if version > FORMAT_VERSION:
        raise ConfigError(
            f"{path} was written by a newer infinity (format version {_short(version)}; this one "
            f"reads up to {FORMAT_VERSION}): upgrade infinity to open it"
        )
    return check_doc(doc, path)


def _short(value, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (a manifest may hold anything)."""
    if isinstance(value, int) and abs(value).bit_length() > 128:
        return f"<an integer of {value.bit_length()} bits>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(directory: str, name: str, payload: bytes) -> None:
    """Write, fsync, rename, fsync the directory: readers see the old or the new file. The
    temporary file is created afresh (O_EXCL, no link followed): a link left in its place is
    removed, never written through. A failure (a full disk, a read-only filesystem) is a
    StorageIOError that leaves the old file in place and no temporary file behind."""
    final = os.path.join(directory, name)
    tmp = final + ".tmp"
    try:
        os.unlink(tmp)  # a leftover of a crash, or a planted link: the name, never its target
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise ConfigError(f"{tmp} is a directory; remove it (the store writes that name)") from None
    except OSError as exc:
        raise io_error(exc, tmp, f"remove the leftover {tmp}") from None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o644)
    except OSError as exc:
        raise io_error(exc, tmp, f"create {name}", len(payload)) from None
    try:
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass  # the write's error is the one to report
        raise io_error(exc, final, f"write {name} ({len(payload)} bytes)", len(payload)) from None
    try:
        fsync_dir(directory)
    except OSError as exc:
        raise io_error(exc, directory, f"fsync the directory after writing {name}") from None


def commit_token(directory: str):
    """Identity of the committed state in ``directory``: (inode, times, size) of the manifest
    and of the in-place record; None when there is no manifest. A reader compares tokens to
    know whether a commit landed while it read."""
    token = []
    for name in (MANIFEST, INPLACE):
        try:
            st = os.stat(os.path.join(directory, name))
        except FileNotFoundError:
            if name == MANIFEST:
                return None
            token.append(None)
            continue
        token.append((st.st_ino, st.st_ctime_ns, st.st_mtime_ns, st.st_size))
    return tuple(token)


def read_manifest(directory: str) -> dict[str, Any] | None:
    path = os.path.join(directory, MANIFEST)
    raw = read_file(path, missing_ok=True)
    return None if raw is None else decode(raw, path)


def write_inplace(directory: str, generation: int, keys, settled=()) -> None:
    """Record, durably and before the first byte is written, the keys about to be rewritten in
    place after the commit of ``generation``: after a crash their data may be old, new or torn
    while the manifest still holds the old checksum, so they are always read verified.
    ``settled``: those of ``keys`` that nobody is writing (torn by a crash or a failed write):
    a reader reads them verified at once rather than wait for the writer's next commit."""
    if keys:
        doc = {"generation": generation, "keys": sorted(keys)}
        if settled:
            doc["settled"] = sorted(set(settled) & set(keys))
        write_atomic(directory, INPLACE, encode(doc))
    else:
        path = os.path.join(directory, INPLACE)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise io_error(exc, path, f"remove {INPLACE}") from None


def read_inplace(directory: str, generation: int) -> tuple[set[str], set[str]]:
    """The keys ``write_inplace`` listed for ``generation``, or for the next one (a flush lists
    them for the generation it is about to commit, before committing it), and the settled ones
    among them; an older record is stale."""
    path = os.path.join(directory, INPLACE)
    raw = read_file(path, missing_ok=True)
    if raw is None:
        return set(), set()
    doc = decode_body(raw, path)
    if not isinstance(doc, dict) or doc.get("generation") not in (generation, generation + 1):
        return set(), set()
    keys, settled = doc.get("keys"), doc.get("settled", [])
    for names in (keys, settled):
        if not isinstance(names, list) or not all(isinstance(k, str) for k in names):
            raise IntegrityError(f"{path} is damaged: its keys are not a list of names")
    return set(keys), set(settled) & set(keys)
