"""A Hugging Face checkpoint directory, read as untrusted input: which files it holds
(config.json, the index, the safetensors shards, the files copied next to model.json), each
resolved and checked (``member``, ``checkpoint_files``), the safetensors headers checked whole
against their files before a byte of tensor data is read (``read_safetensors_header``), and the
tensors' bytes read with pread at the checked offsets (``read_tensor``: no mmap, so a file cut
short while it is read is an IntegrityError, not a SIGBUS).

Every file must be a regular file (no FIFO, device or directory) inside the checkpoint; a
symlink may point inside it or, in a Hub cache snapshot (.../models--X/snapshots/REV), into that
repository's blobs/. The index may name only .safetensors files next to it. A damaged
safetensors file (header length, header text, offsets, sizes, overlaps, holes, a short file) is
an IntegrityError naming the file, the tensor and the numbers; a dtype infinity does not convert
is a ConfigError.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from infinity.errors import ConfigError, IntegrityError, StorageIOError
from infinity.files import load_json, open_config

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
COPIED = (  # next to model.json, verbatim
    "config.json generation_config.json tokenizer.json tokenizer_config.json "
    "special_tokens_map.json tokenizer.model vocab.json merges.txt added_tokens.json "
    "chat_template.jinja chat_template.json"
).split()
SAFETENSORS_DTYPES = {  # header name -> torch dtype
    name: getattr(torch, dtype)
    for name, dtype in zip(
        "F64 F32 F16 BF16 F8_E4M3 F8_E5M2 I64 I32 I16 I8 U8 BOOL".split(),
        "float64 float32 float16 bfloat16 float8_e4m3fn float8_e5m2 int64 int32 int16 int8 "
        "uint8 bool".split(),
        strict=True,
    )
}
ITEM_BYTES = {
    name: torch.empty((), dtype=d).element_size() for name, d in SAFETENSORS_DTYPES.items()
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit on the JSON header
PICKLES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class TensorSource:
    """A checkpoint tensor: its name, dtype and shape, and where its bytes are (the file, the
    offset of its first byte in the file, its length)."""

    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file_offset: int
    nbytes: int


def _listing(names: list[str]) -> str:
    shown = ", ".join(n if n.isprintable() else repr(n) for n in names[:12])
    more = f" and {len(names) - 12} more" if len(names) > 12 else ""
    return shown + more or "nothing"


def checkpoint_files(hf_dir: str) -> tuple[list[str], dict]:
    """The safetensors files of a checkpoint and its fingerprint; ConfigError saying what is
    there and what to do when it is not a safetensors checkpoint."""
    if not os.path.exists(hf_dir):
        raise ConfigError(
            f"{hf_dir} does not exist: give the directory of a Hugging Face checkpoint "
            "(config.json and *.safetensors)"
        )
    if not os.path.isdir(hf_dir):
        raise ConfigError(f"{hf_dir} is not a directory: give the one holding config.json")
    names = sorted(os.listdir(hf_dir))
    if "config.json" not in names:
        raise ConfigError(
            f"{hf_dir} has no config.json (it holds: {_listing(names)}): give a Hugging Face "
            "model directory, as save_pretrained writes it or as downloaded from the Hub"
        )
    if INDEX in names:
        files = index_shards(hf_dir, names)
        fingerprinted = ["config.json", INDEX, *files]
    elif SINGLE in names:
        files, fingerprinted = [SINGLE], ["config.json", SINGLE]
    else:
        other = [n for n in names if n.endswith(".safetensors")]
        pickles = [n for n in names if n.endswith(PICKLES)]
        if other:
            raise ConfigError(
                f"{hf_dir} has safetensors files ({_listing(other)}) but neither {SINGLE} nor "
                f"{INDEX}: it is not in the layout save_pretrained writes; re-save it with "
                "transformers' save_pretrained"
            )
        if pickles:
            raise ConfigError(f"{hf_dir} holds {_pickle_advice(hf_dir, pickles)}")
        raise ConfigError(
            f"{hf_dir} has no weights: no {SINGLE} or {INDEX} (it holds: {_listing(names)})"
        )
    real = {n: member(hf_dir, n) for n in [*fingerprinted, *(c for c in COPIED if c in names)]}
    for path in real.values():  # regular files, or refused before anything is written
        os.close(open_config(path, "checkpoint file", follow=False))
    stats = {n: os.stat(real[n]) for n in fingerprinted}
    source = {
        "dir": hf_dir,
        "files": {n: {"bytes": s.st_size, "mtime_ns": s.st_mtime_ns} for n, s in stats.items()},
    }
    return [real[f] for f in files], source


def _pickle_advice(hf_dir: str, pickles: list[str]) -> str:
    return (
        f"PyTorch pickle weights ({_listing(pickles)}), not safetensors: infinity reads "
        "safetensors only (unpickling can run code). Re-save them: "
        f'python -c "from transformers import AutoModelForCausalLM as M; '
        f"M.from_pretrained('{hf_dir}').save_pretrained('{hf_dir}-safetensors')\", "
        "then convert that directory"
    )


def index_shards(hf_dir: str, names: list[str]) -> list[str]:
    """The shard files the index names: .safetensors files next to it, all present."""
    where = f"{hf_dir}/{INDEX}"
    index = load_json(member(hf_dir, INDEX), INDEX, follow=False)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConfigError(
            f'{where} is not a valid index: it needs a non-empty "weight_map" object (tensor '
            "name -> shard file name); the file is damaged: download it again"
        )
    wrong = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str)), None)
    if wrong is not None:
        raise ConfigError(
            f"{where} maps {wrong[0]!r} to {wrong[1]!r}, not a file name: the index is damaged; "
            "download it again"
        )
    files = sorted(set(weight_map.values()))
    for name in files:
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise ConfigError(
                f"{where} names the shard {name!r}, which is not a file name: shards are files "
                "next to the index (no directories, no paths); the index is damaged or was "
                "written by hand: fix it or download it again"
            )
        if name.endswith(PICKLES):
            raise ConfigError(f"{where} names {_pickle_advice(hf_dir, [name])}")
        if not name.endswith(".safetensors"):
            raise ConfigError(
                f"{where} maps tensors to {name}, which is not a .safetensors file: the index "
                "is damaged or belongs to another format; download it again"
            )
    absent = [f for f in files if f not in names]
    if absent:
        raise ConfigError(
            f"{INDEX} names shards that are not in {hf_dir}: {_listing(absent)}; the "
            "download is incomplete: fetch those files"
        )
    return files


def member(hf_dir: str, name: str) -> str:
    """The real path of the checkpoint file ``name``; ConfigError for a symlink that leaves the
    checkpoint. Allowed targets: anything inside ``hf_dir``, and for a Hugging Face cache
    snapshot (.../models--X/snapshots/REV/NAME -> ../../blobs/HASH) a file in its blobs/."""
    path = os.path.join(hf_dir, name)
    real, root = os.path.realpath(path), os.path.realpath(hf_dir)
    if os.path.commonpath([real, root]) == root:
        return real
    snapshots = os.path.dirname(root)
    if os.path.basename(snapshots) == "snapshots":
        if os.path.dirname(real) == os.path.join(os.path.dirname(snapshots), "blobs"):
            return real
    raise ConfigError(
        f"{path} is a symbolic link to {real}, outside the checkpoint {hf_dir} (and not a "
        "Hugging Face cache blob): infinity reads and copies only the checkpoint's own files; "
        f"if you trust it, replace the link with a copy (cp --remove-destination {real} {path})"
    )


def read_headers(files: list[str]) -> dict[str, TensorSource]:
    """name -> TensorSource of every tensor in the safetensors files (headers only)."""
    found: dict[str, TensorSource] = {}
    for path in files:
        for src in read_safetensors_header(path):
            if src.name in found:
                raise ConfigError(
                    f"{_short(src.name)} is in both {found[src.name].file} and {path}"
                )
            found[src.name] = src
    return found


def read_safetensors_header(path: str | os.PathLike) -> list[TensorSource]:
    """The tensors of the safetensors file ``path``, in file order, from its header alone,
    checked against the file before a byte of tensor data is read: the 8-byte header length
    (at least 2, at most 100 MB, inside the file), the header (UTF-8 JSON, an object, no key
    twice), each entry (a supported dtype, a shape of whole numbers, data_offsets [begin, end]
    spanning exactly numel x itemsize, inside the file), and the data (covered exactly: no
    overlap, no hole, nothing after the last tensor, as the format requires).

    IntegrityError naming the file and what is wrong for a damaged file, ConfigError for a
    dtype infinity does not convert or a path that is no regular file. Never follows a final
    link (``_member`` resolves those first), never blocks on a FIFO."""
    path = os.fspath(path)
    fd = open_config(path, "checkpoint file", follow=False)
    try:
        size = os.fstat(fd).st_size
        if size < 8:
            raise _damaged(
                path, f"it is {size} bytes long; a safetensors file starts with an 8-byte header "
                "length" + (" (the file is empty)" if size == 0 else "")
            )  # fmt: skip
        header_nbytes = int.from_bytes(_pread_all(fd, 8, 0, path), "little")
        if header_nbytes < 2 or header_nbytes > min(MAX_HEADER_BYTES, size - 8):
            if header_nbytes < 2:
                why = "the shortest header, {}, has 2"
            elif header_nbytes > MAX_HEADER_BYTES:
                why = f"the format allows up to {MAX_HEADER_BYTES:,}"
            else:
                why = f"only {size - 8:,} bytes follow it in the file"
            raise _damaged(path, f"its header length is {header_nbytes:,} bytes; {why}")
        raw = _pread_all(fd, header_nbytes, 8, path)
    finally:
        os.close(fd)
    doc = _header_json(raw, path)
    data_nbytes = size - 8 - header_nbytes
    sources = [
        _entry(name, value, path, 8 + header_nbytes, data_nbytes)
        for name, value in doc.items()
        if name != "__metadata__"
    ]
    sources.sort(key=lambda s: (s.file_offset, s.nbytes))
    end, last = 8 + header_nbytes, None
    for src in sources:
        if src.file_offset < end:
            raise _damaged(path, f"tensors {_span(last)} and {_span(src)} overlap")
        if src.file_offset > end:
            raise _damaged(path, f"bytes {end:,} to {src.file_offset:,} belong to no tensor")
        end, last = src.file_offset + src.nbytes, src
    if end != size:
        raise _damaged(
            path, f"its tensors end at byte {end:,} but the file has {size:,} bytes; the format "
            "allows nothing after the last tensor"
        )  # fmt: skip
    return sources


def _damaged(path: str, what: str) -> IntegrityError:
    return IntegrityError(
        f"{path} is not a valid safetensors file: {what}. It is damaged or cut short: download "
        "it again (or save the checkpoint again), then run the conversion again"
    )


def _pread_all(fd: int, nbytes: int, file_offset: int, path: str) -> bytes:
    data = b""
    while len(data) < nbytes:
        try:
            chunk = os.pread(fd, nbytes - len(data), file_offset + len(data))
        except OSError as exc:
            raise StorageIOError(path, file_offset, nbytes, exc.errno or 0) from None
        if not chunk:
            raise _damaged(path, f"it ends at byte {file_offset + len(data):,}, inside its header")
        data += chunk
    return data


class _DuplicateKey(ValueError):
    pass


def _unique(pairs: list[tuple[str, object]]) -> dict:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return doc


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {_short(text)} is out of range")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _header_json(raw: bytes, path: str) -> dict:
    """The header as a dict, parsed as strictly as the safetensors library does: UTF-8, an
    object first thing, no NaN or Infinity, no number out of range, no lone surrogate escape
    (what the library refuses is never read here), and no key twice."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _damaged(
            path, f"its header is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
            f"{8 + exc.start:,})"
        ) from None  # fmt: skip
    if not text.startswith("{"):
        raise _damaged(path, f"its header starts with {_short(text[:8])}, not {{")
    try:
        doc = json.loads(
            text, object_pairs_hook=_unique, parse_float=_finite, parse_constant=_no_constant
        )
        json.dumps(doc, ensure_ascii=False).encode("utf-8")  # a lone surrogate fails here
    except _DuplicateKey as exc:
        raise _damaged(path, f"its header names {_short(exc.args[0])} twice") from None
    except RecursionError:
        raise _damaged(path, "its header is nested too deeply to be a safetensors header") from None
    except UnicodeEncodeError:
        raise _damaged(path, "its header holds a lone surrogate escape (\\ud800-\\udfff)") from None
    except ValueError as exc:  # JSONDecodeError, ints over sys.get_int_max_str_digits(), NaN
        raise _damaged(path, f"its header is not JSON ({_short(str(exc))})") from None
    meta = doc.get("__metadata__")
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        raise _damaged(path, f"its __metadata__ {_short(meta)} is not an object of strings")
    return doc


def _short(value, limit: int = 80) -> str:
    """``value`` for a one-line message: a printable str as it is, anything else (a name with a
    newline, a list) as its repr; cut to ``limit`` characters."""
    text = value if isinstance(value, str) and value.isprintable() else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _span(src: TensorSource) -> str:
    return f"{_short(src.name)} (bytes {src.file_offset:,} to {src.file_offset + src.nbytes:,})"


def _count(nbytes: int) -> str:
    return f"{nbytes:,}" if nbytes < 10**30 else f"about 10^{len(str(nbytes)) - 1}"


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(name: str, value, path: str, data_offset: int, data_nbytes: int) -> TensorSource:
    """One header entry checked against the file (see read_safetensors_header)."""
    shown = _short(name)
    if not isinstance(value, dict):
        raise _damaged(
            path, f"the entry of {shown} is a JSON {type(value).__name__}, not an object"
        )
    kind, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if not isinstance(shape, list) or not all(_whole(d) for d in shape):
        raise _damaged(path, f"{shown} has shape {_short(shape)}, not a list of whole numbers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_whole, offsets))):
        raise _damaged(path, f"{shown} has data_offsets {_short(offsets)}, not [begin, end]")
    begin, end = offsets
    if not isinstance(kind, str) or kind not in SAFETENSORS_DTYPES:
        raise ConfigError(
            f"{shown} in {path} has dtype {_short(repr(kind))}, which infinity does not convert "
            f"(it converts {', '.join(SAFETENSORS_DTYPES)})"
        )
    if end > data_nbytes:
        raise _damaged(
            path, f"{shown} has data_offsets [{_short(begin)}, {_short(end)}], past the end of "
            f"the data ({data_nbytes:,} bytes follow the header): the file is cut short"
        )  # fmt: skip
    nbytes = math.prod(shape) * ITEM_BYTES[kind]
    if end - begin != nbytes:
        raise _damaged(
            path, f"{shown} is {kind} of shape {_short(shape)}, {_count(nbytes)} bytes, but its "
            f"data_offsets [{begin:,}, {end:,}] span {end - begin:,} bytes"
        )  # fmt: skip
    return TensorSource(
        name, path, SAFETENSORS_DTYPES[kind], tuple(shape), data_offset + begin, nbytes
    )


def read_tensor(fd: int, src: TensorSource) -> torch.Tensor:
    """The bytes of ``src`` (pread at its offset in the open file ``fd``) as a tensor of its
    dtype and shape."""
    buf = torch.empty(src.nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy()).cast("B")
    done = 0
    while done < src.nbytes:
        at = src.file_offset + done
        try:
            got = os.preadv(fd, [view[done:]], at)
        except OSError as exc:
            raise StorageIOError(src.file, at, src.nbytes - done, exc.errno or 0) from None
        if got == 0:
            raise IntegrityError(
                f"{src.file} ends at byte {at:,}, inside {_span(src)}: the file was cut short "
                "while it was being converted; restore it, then run the conversion again (add "
                "--overwrite if the file changed)"
            )
        done += got
    return buf.view(src.dtype).reshape(src.shape)
