"""A store's directories: creating them, and checking that the paths given are the store's
stripes, in order (each path's member.json names its store and its index)."""

from __future__ import annotations

import os
import uuid

from infinity.errors import ConfigError
from infinity.store import manifest as mf
from infinity.store._files import io_error, read_file


def create(paths: list[str]) -> dict:
    """A new store: member records on every path, then the first manifest (the commit). A
    creation killed before its manifest left members and no data: it is done again."""
    count = len(paths)
    for i, path in enumerate(paths):
        member_path = os.path.join(path, mf.MEMBER)
        raw = read_file(member_path, missing_ok=True)
        if raw is None:
            continue
        member = mf.decode_body(raw, member_path)
        member = member if isinstance(member, dict) else {}
        ours = member.get("index") == i and member.get("count") == count
        if not ours:
            raise ConfigError(
                f"{path} already holds stripe {member.get('index')} of store "
                f"{member.get('store_id')}, but was given as stripe {i}: pass the paths in "
                "the order the store was created with"
            )
        try:
            data = [f for f in os.listdir(path) if f not in (mf.MEMBER, mf.LOCK)]
            data = [f for f in data if not f.endswith(".tmp")]
            full = any(os.lstat(os.path.join(path, f)).st_size for f in data)
        except OSError as exc:
            raise io_error(exc, path, "list the store directory") from None
        if full:
            raise ConfigError(
                f"{path} is stripe {i} of store {member.get('store_id')} but "
                f"{paths[0]} has no {mf.MANIFEST}, and {path} holds data "
                f"({', '.join(sorted(data))}): the manifest was deleted or the first path "
                "is wrong; restore manifest.json, or delete the directories to start over"
            )
    doc = {
        "format": mf.FORMAT,
        "version": mf.FORMAT_VERSION,
        "store_id": uuid.uuid4().hex,
        "generation": 0,
        "files": ["data.bin"] * count,
        "entries": {},
    }
    for i, path in enumerate(paths):
        member = {"store_id": doc["store_id"], "index": i, "count": count}
        mf.write_atomic(path, mf.MEMBER, mf.encode(member))
    mf.write_atomic(paths[0], mf.MANIFEST, mf.encode(doc))
    return doc


def check_members(paths: list[str], doc: dict) -> None:
    """Each path is the stripe of this store that its position says (member.json)."""
    count = len(doc["files"])
    if count != len(paths):
        raise ConfigError(f"store {paths[0]} spans {count} paths; {len(paths)} were given")
    for i, path in enumerate(paths):
        member_path = os.path.join(path, mf.MEMBER)
        member = mf.decode_body(read_file(member_path), member_path)
        member = member if isinstance(member, dict) else {}
        if member.get("store_id") != doc["store_id"] or member.get("index") != i:
            raise ConfigError(
                f"{path} is stripe {member.get('index')} of store {member.get('store_id')}, "
                f"but was given as stripe {i} of store {doc['store_id']}: pass the paths in "
                "the order the store was created with"
            )
