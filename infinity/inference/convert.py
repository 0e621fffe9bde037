"""infinity convert: a Hugging Face safetensors checkpoint -> a TieredStore plus model.json.

Call order of ``convert``:
1. ``plan_layout`` finds config.json and the safetensors files (one file, or the shards of an
   index), fingerprints them (names, sizes, mtimes), builds the model on the meta device and
   hands it with the checkpoint's headers to ``layout.plan`` (nothing is read), which returns the
   layout: units in forward order, one record per stored tensor, what is tied.
2. An earlier conversion in STORE_DIR: complete -> returned as it is; incomplete with the same
   fingerprint and dtype -> resumed; anything else -> ConfigError (unless ``overwrite``).
3. Free space is checked against the bytes still to write, before any tensor is written.
4. config.json, generation_config.json and the tokenizer files are copied; model.json is saved
   with complete=False; each unit's tensors are then read one at a time (safe_open), cast or
   quantized and put one after another (a reader thread prepares the next tensor while one is
   written); the store is flushed after each unit; model.json is saved with complete=True.
Untrusted input: every file read or copied from HF_DIR must be a regular file (no FIFO, device
or directory) inside HF_DIR; a symlink may point inside HF_DIR or, in a Hub cache snapshot
(.../models--X/snapshots/REV), into that repository's blobs/; any other is refused, a copied
file as much as a shard (a model without its tokenizer is broken too, so nothing is skipped).
STORE_DIR and the store paths must not be HF_DIR, inside it, or hold it. config.json's
dimensions are checked against ``estimate.MODEL_LIMITS`` before the meta model is built.
Resume keeps each unit whose keys are all committed with the recorded dtype and shape and deletes
every other key before writing those units again, so that the result equals an uninterrupted
conversion (keys, bytes, checksums, versions, layout) and each layer stays contiguous.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from infinity.config import ALIGNMENT_BYTES
from infinity.errors import CapacityError, ConfigError
from infinity.estimate import check_model_config
from infinity.files import load_json, open_config
from infinity.inference.layout import (
    LAYOUT_FILE,
    ModelLayout,
    TensorRecord,
    Unit,
    build_meta_model,
    plan,
)
from infinity.store.manifest import MANIFEST, MEMBER, dtype_from_name, dtype_name

log = logging.getLogger(__name__)

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INDEX, SINGLE, DATA_DIR = "model.safetensors.index.json", "model.safetensors", "data"
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

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class _Source:
    """Where a stored parameter's bytes are: its name in the checkpoint and the file."""

    name: str
    file: str


def convert(
    hf_dir: str | os.PathLike,
    store_dir: str | os.PathLike,
    dtype: str = "auto",
    nvme_paths: list[str | os.PathLike] | None = None,
    progress: Progress | None = None,
    *,
    overwrite: bool = False,
    store_config=None,
) -> ModelLayout:
    """Convert the checkpoint in ``hf_dir`` into ``store_dir`` (see the module docstring).

    ``dtype``: "auto" keeps the checkpoint's dtypes; "fp32"/"bf16"/"fp16" cast floating tensors;
    "fp8" stores the 2-D weights of the decoder layers as float8_e4m3fn with a float32 scale per
    output channel, everything else in bf16. ``nvme_paths``: the store's directories (default
    STORE_DIR/data). ``progress(nbytes_done, nbytes_total, unit_name)`` runs when writing starts
    (unit_name "") and after each unit is durable (what it raises stops the conversion; a rerun
    resumes). ``overwrite`` discards an
    earlier conversion in STORE_DIR and empties the store at the store paths. ``store_config``:
    the StoreConfig to write with (default: no pinned tier)."""
    from safetensors import safe_open

    from infinity.store import StoreConfig, TieredStore

    store_dir = os.path.abspath(store_dir)
    paths = [os.path.abspath(p) for p in (nvme_paths or [os.path.join(store_dir, DATA_DIR)])]
    _refuse_overlap(os.path.abspath(hf_dir), store_dir, paths)
    layout, sources = plan_layout(hf_dir, dtype, paths)
    config = store_config or StoreConfig(pinned_bytes=0)
    earlier = _earlier(store_dir, overwrite)
    if earlier is not None:
        _check_same(earlier, layout, store_dir)
        if earlier.complete:
            log.info("%s already holds this conversion: nothing to do", store_dir)
            return earlier
    elif overwrite:
        _empty_stores(paths, config)
    else:
        _refuse_foreign_store(paths)
    if earlier is None:  # nothing may be written if it cannot fit
        _check_space(layout, layout.units, paths)
    os.makedirs(store_dir, exist_ok=True)
    _copy_metadata(layout.source["dir"], store_dir)
    layout.save(store_dir)
    total = sum(u.nbytes for u in layout.units)
    opened: dict = {}

    def read(name: str) -> list[tuple[str, torch.Tensor]]:  # on the reader thread
        src = sources[name]
        if src.file not in opened:
            opened[src.file] = files.enter_context(safe_open(src.file, framework="pt"))
        return list(_to_store(opened[src.file].get_tensor(src.name), layout.tensors[name]))

    with (
        TieredStore.open(paths, config) as store,
        ExitStack() as files,
        ThreadPoolExecutor(1, thread_name_prefix="infinity-convert") as reader,
    ):
        todo = _resume(store, layout) if earlier is not None else list(layout.units)
        if earlier is not None:
            _check_space(layout, todo, paths)
        done = total - sum(u.nbytes for u in todo)
        log.info("converting %s into %s: %d of %d units to write", layout.source["dir"],
                 store_dir, len(todo), len(layout.units))  # fmt: skip
        if progress is not None:
            progress(done, total, "")  # writing starts
        names = iter([name for unit in todo for name in unit.tensors])
        ahead = deque(reader.submit(read, n) for n in itertools.islice(names, 1))
        for unit in todo:
            for _ in unit.tensors:  # the next tensor is read and cast while this one is put
                following = next(names, None)
                if following is not None:
                    ahead.append(reader.submit(read, following))
                for key, stored in ahead.popleft().result():
                    store.put(key, stored)
            store.flush()
            done += unit.nbytes
            if progress is not None:
                progress(done, total, unit.name)
    layout.complete = True
    layout.save(store_dir)
    return layout


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D weight as float8_e4m3fn plus a float32 scale per row (output channel), with
    ``weight ~= q.float() * scale[:, None]``; scale = row amax / 448, 1 for rows of zeros."""
    w = weight.float()
    amax = w.abs().amax(dim=1) if w.shape[1] else torch.zeros(w.shape[0])
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def plan_layout(
    hf_dir: str | os.PathLike, dtype: str = "auto", store_paths: list[str] | None = None
) -> tuple[ModelLayout, dict[str, _Source]]:
    """The layout a conversion writes (layout.plan over the checkpoint's headers), and where
    each stored parameter's bytes are; reads config.json and the safetensors headers only."""
    import transformers

    hf_dir = os.path.abspath(hf_dir)
    files, source = _checkpoint(hf_dir)
    raw = load_json(_member(hf_dir, "config.json"), "config.json", follow=False)
    if not isinstance(raw, dict):
        raise ConfigError(f"{hf_dir}/config.json holds a JSON {type(raw).__name__}, not an object")
    check_model_config(raw, f"{hf_dir}/config.json")
    try:
        config = transformers.AutoConfig.from_pretrained(hf_dir)
    except (ValueError, KeyError, OSError) as exc:
        raise ConfigError(
            f"{hf_dir}/config.json: transformers {transformers.__version__} cannot read it "
            f"({exc}); upgrade transformers or check the file"
        ) from None
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else type(quant).__name__
        raise ConfigError(
            f"{hf_dir} is a quantized checkpoint ({method}); infinity converts unquantized "
            "weights only: convert the original bf16/fp16 checkpoint (--dtype fp8 quantizes)"
        )
    header = _headers(files)
    checkpoint = {name: (kind, shape) for name, (_, kind, shape) in header.items()}
    layout, read_from = plan(build_meta_model(config), checkpoint, dtype, store_paths, source)
    return layout, {name: _Source(found, header[found][0]) for name, found in read_from.items()}


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
    return shown or "nothing"


def _checkpoint(hf_dir: str) -> tuple[list[str], dict]:
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
        index = load_json(_member(hf_dir, INDEX), INDEX, follow=False)
        try:
            files = sorted(set(index["weight_map"].values()))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{hf_dir}/{INDEX} is not a valid index ({exc!r})") from None
        absent = [f for f in files if f not in names]
        if absent:
            raise ConfigError(
                f"{INDEX} names shards that are not in {hf_dir}: {_listing(absent)}; the "
                "download is incomplete: fetch those files"
            )
        fingerprinted = ["config.json", INDEX, *files]
    elif SINGLE in names:
        files, fingerprinted = [SINGLE], ["config.json", SINGLE]
    else:
        other = [n for n in names if n.endswith(".safetensors")]
        pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        if other:
            raise ConfigError(
                f"{hf_dir} has safetensors files ({_listing(other)}) but neither {SINGLE} nor "
                f"{INDEX}: it is not in the layout save_pretrained writes; re-save it with "
                "transformers' save_pretrained"
            )
        if pickles:
            raise ConfigError(
                f"{hf_dir} holds PyTorch pickle weights ({_listing(pickles)}), not safetensors: "
                "infinity reads safetensors only (unpickling can run code). Re-save them: "
                f'python -c "from transformers import AutoModelForCausalLM as M; '
                f"M.from_pretrained('{hf_dir}').save_pretrained('{hf_dir}-safetensors')\", "
                "then convert that directory"
            )
        raise ConfigError(
            f"{hf_dir} has no weights: no {SINGLE} or {INDEX} (it holds: {_listing(names)})"
        )
    real = {n: _member(hf_dir, n) for n in [*fingerprinted, *(c for c in COPIED if c in names)]}
    for path in real.values():  # regular files, or refused before anything is written
        os.close(open_config(path, "checkpoint file", follow=False))
    stats = {n: os.stat(real[n]) for n in fingerprinted}
    source = {
        "dir": hf_dir,
        "files": {n: {"bytes": s.st_size, "mtime_ns": s.st_mtime_ns} for n, s in stats.items()},
    }
    return [real[f] for f in files], source


def _member(hf_dir: str, name: str) -> str:
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


def _refuse_overlap(hf_dir: str, store_dir: str, store_paths: list[str]) -> None:
    """ConfigError when STORE_DIR or a store path is HF_DIR, inside it, or holds it."""
    if not os.path.isdir(hf_dir):
        return  # _checkpoint says what is wrong with it
    for path in [store_dir, *store_paths]:
        if _within(path, hf_dir) or _within(hf_dir, path):
            raise ConfigError(
                f"the store {path} and the checkpoint {hf_dir} overlap (the same directory, or "
                "one inside the other): converting would write into the checkpoint it reads; "
                "give a STORE_DIR (and --nvme-path) outside the checkpoint, and the checkpoint "
                "outside them"
            )


def _within(inner: str, outer: str) -> bool:
    """``inner`` is ``outer`` or below it: by real path, and by inode for the existing part (a
    bind mount or a hard-linked directory has another path)."""
    real_inner, real_outer = os.path.realpath(inner), os.path.realpath(outer)
    if os.path.commonpath([real_inner, real_outer]) == real_outer:
        return True
    if not os.path.exists(real_outer):
        return False
    path = real_inner
    while True:
        if os.path.exists(path) and os.path.samefile(path, real_outer):
            return True
        parent = os.path.dirname(path)
        if parent == path:
            return False
        path = parent


def _headers(files: list[str]) -> dict[str, tuple[str, torch.dtype, tuple[int, ...]]]:
    """name -> (file, dtype, shape) of every tensor in the safetensors files (headers only)."""
    from safetensors import safe_open

    found: dict[str, tuple[str, torch.dtype, tuple[int, ...]]] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                kind = piece.get_dtype()
                if kind not in SAFETENSORS_DTYPES:
                    raise ConfigError(f"{name} in {path} has dtype {kind}, which is not supported")
                if name in found:
                    raise ConfigError(f"{name} is in both {found[name][0]} and {path}")
                shape = tuple(int(d) for d in piece.get_shape())
                found[name] = (path, SAFETENSORS_DTYPES[kind], shape)
    return found


# -- writing helpers ------------------------------------------------------------------------------
def _to_store(tensor: torch.Tensor, record: TensorRecord):
    """(key, tensor) pairs to put for one parameter: the cast tensor, or the fp8 weight and its
    scale."""
    if record.scale_key is not None:
        if not torch.isfinite(tensor).all():
            raise ConfigError(f"{record.name} holds inf or nan: it cannot be stored as fp8")
        q, scale = quantize_fp8(tensor)
        yield record.key, q
        yield record.scale_key, scale
        return
    target = dtype_from_name(record.dtype)
    yield record.key, tensor if tensor.dtype == target else tensor.to(target)


def _earlier(store_dir: str, overwrite: bool) -> ModelLayout | None:
    path = os.path.join(store_dir, LAYOUT_FILE)
    if overwrite and os.path.exists(path):
        os.remove(path)
    return ModelLayout.load(store_dir, allow_incomplete=True) if os.path.exists(path) else None


def _check_same(earlier: ModelLayout, layout: ModelLayout, store_dir: str) -> None:
    state = "complete" if earlier.complete else "partial"
    fix = "give another STORE_DIR, or overwrite=True (--overwrite) to discard it"
    if earlier.source.get("files") != layout.source["files"]:
        raise ConfigError(
            f"{store_dir} holds a {state} conversion of another checkpoint "
            f"({earlier.source.get('dir')}, or its files changed since: names, sizes or mtimes "
            f"differ from {layout.source['dir']}): {fix}"
        )
    if earlier.dtype != layout.dtype:
        raise ConfigError(
            f"{store_dir} holds a {state} conversion with dtype {earlier.dtype!r}, not "
            f"{layout.dtype!r}: {fix}"
        )
    if earlier.store_paths != layout.store_paths:
        raise ConfigError(
            f"{store_dir} holds a {state} conversion stored in {earlier.store_paths}, not "
            f"{layout.store_paths}: give the same --nvme-path, or {fix}"
        )


def _refuse_foreign_store(paths: list[str]) -> None:
    for path in paths:
        if any(os.path.exists(os.path.join(path, n)) for n in (MANIFEST, MEMBER)):
            raise ConfigError(
                f"{path} already holds an infinity store that no conversion in this STORE_DIR "
                "wrote: give an empty directory, or overwrite=True (--overwrite) to empty it"
            )


def _empty_stores(paths: list[str], config) -> None:
    from infinity.store import TieredStore

    if not os.path.exists(os.path.join(paths[0], MANIFEST)):
        return
    with TieredStore.open(paths, config) as store:
        for key in store.keys():
            store.delete(key)
        store.compact()


def _resume(store, layout: ModelLayout) -> list[Unit]:
    """The units still to write; deletes every key that is not part of a unit kept as it is."""

    def stored(key: str) -> bool:
        record = layout.tensors[key]
        if key not in store:
            return False
        entry = store.entry(key)
        return dtype_name(entry.dtype) == record.dtype and tuple(entry.shape) == record.shape

    keep, todo = set(), []
    for unit in layout.units:
        keys = layout.unit_keys(unit.name)
        if all(stored(k) for k in keys):
            keep.update(keys)
        else:
            todo.append(unit)
    for key in store.keys():
        if key not in keep:
            store.delete(key)
    store.compact()  # commits, and gives back the tail a killed run may have left written
    return todo


def _check_space(layout: ModelLayout, units: list[Unit], paths: list[str]) -> None:
    count = len(paths)
    need = 0
    for unit in units:
        for key in layout.unit_keys(unit.name):
            blocks = max(1, -(-layout.tensors[key].nbytes // ALIGNMENT_BYTES))
            need += (blocks + count - 1) * ALIGNMENT_BYTES  # one partial block per stripe
    devices = {}
    for path in paths:
        existing = path
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        devices[os.stat(existing).st_dev] = shutil.disk_usage(existing).free
    free = sum(devices.values())
    if need > free:
        raise CapacityError(
            f"not enough free space to convert: {need / 1e9:.2f} GB to write ({need:,} bytes), "
            f"{free / 1e9:.2f} GB free ({free:,} bytes) on {', '.join(paths)}; free space or give "
            "store paths on a larger drive (--nvme-path, several to stripe over drives)"
        )


def _copy_metadata(hf_dir: str, store_dir: str) -> None:
    """Copy the COPIED files present; each must be a regular file inside the checkpoint (a
    symlink that leaves it, a FIFO, a device or a directory is refused, not skipped: a model
    without its tokenizer is broken too)."""
    for name in COPIED:
        if not os.path.lexists(os.path.join(hf_dir, name)):
            continue
        fd = open_config(_member(hf_dir, name), name, follow=False)
        tmp = os.path.join(store_dir, name + ".tmp")
        with os.fdopen(fd, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, os.path.join(store_dir, name))
