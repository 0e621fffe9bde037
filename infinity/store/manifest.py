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
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from infinity.errors import ConfigError, IntegrityError

FORMAT = "infinity-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MEMBER = "member.json"
LOCK = "LOCK"


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
            f"manifest names dtype {name!r}, which this torch {torch.__version__} lacks"
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
    def from_record(cls, key: str, rec: dict[str, Any]) -> Entry:
        return cls(
            key=key,
            dtype=dtype_from_name(rec["dtype"]),
            shape=tuple(int(d) for d in rec["shape"]),
            nbytes=int(rec["nbytes"]),
            extents=[Extent(int(f), int(o), int(n)) for f, o, n in rec["extents"]],
            checksum=str(rec["checksum"]),
            version=int(rec["version"]),
        )


def encode(doc: dict[str, Any]) -> bytes:
    """Canonical JSON plus a checksum of itself, so that a damaged manifest is detected."""
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return json.dumps({"body": body, "checksum": checksum_bytes(body.encode())}).encode() + b"\n"


def decode_body(raw: bytes, path: str) -> dict[str, Any]:
    """The checked body of a file written with ``encode``."""
    try:
        outer = json.loads(raw)
        body = outer["body"]
        stored = outer["checksum"]
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{path} is not a valid infinity store file ({exc})") from None
    actual = checksum_bytes(body.encode())
    if actual != stored:
        raise IntegrityError(f"{path} is damaged: checksum {actual}, recorded {stored}")
    return json.loads(body)


def decode(raw: bytes, path: str) -> dict[str, Any]:
    doc = decode_body(raw, path)
    if doc.get("format") != FORMAT:
        raise ConfigError(
            f"{path} is not an infinity store manifest (format {doc.get('format')!r})"
        )
    if int(doc.get("version", 0)) > FORMAT_VERSION:
        raise ConfigError(
            f"{path} was written by a newer infinity (format version {doc['version']}; this one "
            f"reads up to {FORMAT_VERSION}): upgrade infinity to open it"
        )
    return doc


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(directory: str, name: str, payload: bytes) -> None:
    """Write, fsync, rename, fsync the directory: readers see the old or the new file."""
    final = os.path.join(directory, name)
    tmp = final + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    fsync_dir(directory)


def read_manifest(directory: str) -> dict[str, Any] | None:
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    return decode(raw, path)
