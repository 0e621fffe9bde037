"""infinity convert: a Hugging Face safetensors checkpoint -> a TieredStore plus model.json.

Call order of ``convert``:
1. ``plan_layout`` finds config.json and the safetensors files (one file, or the shards of an
   index), fingerprints them (names, sizes, mtimes), builds the model on the meta device, maps
   the checkpoint's names onto the model's as ``from_pretrained`` does (``keymap.match``:
   transformers' renamings, prefixes, and its converters run on meta tensors) and hands that to
   ``layout.plan`` (nothing is read), which returns the layout: units in forward order, one
   record per stored tensor, what is tied.
   Each safetensors header is checked whole against its file
   (``checkpoint.read_safetensors_header``) before a byte of tensor data is read.
2. An earlier conversion in STORE_DIR: complete -> returned as it is; incomplete with the same
   fingerprint and dtype -> resumed; anything else -> ConfigError (unless ``overwrite``).
3. Free space is checked against the bytes still to write, before any tensor is written.
4. ``_start``: STORE_DIR is made, O_DIRECT is probed in each store path; config.json,
   generation_config.json and the tokenizer files are copied; model.json is saved with
   complete=False; the store is opened. A fresh conversion that fails here takes back what it
   made (files and directories), so a refused conversion leaves nothing behind.
5. Each unit's tensors are read one at a time (pread at the offsets of the checked header, no
   mmap: a file cut short while converting is an IntegrityError, not a SIGBUS; a tensor that
   transformers makes from several, such as Mixtral's stacked experts, from all of them), cast or
   quantized and put one after another (a reader thread prepares the next tensor while one is
   written); the store is flushed after each unit; model.json is saved with complete=True. A
   failure from here on leaves model.json incomplete: ``ModelLayout.load`` refuses it and says
   to run convert again, which resumes.
Untrusted input: what HF_DIR holds is read through ``checkpoint.py`` (regular files inside the
checkpoint only, nothing skipped: a model without its tokenizer is broken too; damaged
safetensors files refused with the numbers). STORE_DIR and the store paths must not be HF_DIR,
inside it, or hold it; the store paths must be distinct directories, with existing parents, not
on tmpfs (unless INFINITY_ALLOW_TMPFS=1): all checked before anything is written. config.json's
dimensions are checked against ``estimate.MODEL_LIMITS`` before the meta model is built.
Resume keeps each unit whose keys are all committed with the recorded dtype and shape and deletes
every other key before writing those units again, so that the result equals an uninterrupted
conversion (keys, bytes, checksums, versions, layout) and each layer stays contiguous.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import shutil
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import torch

from infinity.config import ALIGNMENT_BYTES
from infinity.errors import CapacityError, ConfigError, StorageIOError
from infinity.estimate import check_model_config
from infinity.files import load_json, open_config
from infinity.inference.checkpoint import (
    COPIED,
    TensorSource,
    checkpoint_files,
    member,
    read_headers,
    read_tensor,
)
from infinity.inference.keymap import Conversion, match
from infinity.inference.layout import (
    LAYOUT_FILE,
    ModelLayout,
    TensorRecord,
    Unit,
    architecture_of,
    build_meta_model,
    find_layers,
    plan,
)
from infinity.io.fsinfo import MEMORY_FS, mount_of, probe_direct_io
from infinity.store.manifest import MANIFEST, MEMBER, dtype_from_name, dtype_name

log = logging.getLogger(__name__)

FP8_MAX = 448.0  # largest finite float8_e4m3fn
DATA_DIR = "data"
Progress = Callable[[int, int, str], None]


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
    from infinity.store import StoreConfig

    store_dir = os.path.abspath(store_dir)
    paths = [os.path.abspath(p) for p in (nvme_paths or [os.path.join(store_dir, DATA_DIR)])]
    _refuse_overlap(os.path.abspath(hf_dir), store_dir, paths)
    _check_destination(store_dir, paths)
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
    total = sum(u.nbytes for u in layout.units)
    fds: dict[str, int] = {}
    waiting: set[str] = set()  # the names still to read (the reader thread owns these two)
    made: dict[str, torch.Tensor] = {}  # a Conversion's outputs that are not written yet

    def read_source(src: TensorSource) -> torch.Tensor:
        if src.file not in fds:
            fds[src.file] = open_config(src.file, "checkpoint file", follow=False)
            files.callback(os.close, fds[src.file])
        return read_tensor(fds[src.file], src)

    def read(name: str) -> list[tuple[str, torch.Tensor]]:  # on the reader thread
        src = sources[name]
        if isinstance(src, TensorSource):
            tensor = read_source(src)
        elif name in made:
            tensor = made.pop(name)
        else:  # run once; the other outputs wait here for their turn (the same unit, mostly)
            out = src.run(read_source)
            if name not in out:
                raise ConfigError(
                    f"transformers' conversion of {src.describe()} made {sorted(out)}, not "
                    f"{name} as planned: report this with your transformers version"
                )
            tensor = out.pop(name)
            made.update((n, t) for n, t in out.items() if n in waiting and n != name)
        waiting.discard(name)
        record = layout.tensors[name]
        if tuple(tensor.shape) != record.shape:
            raise ConfigError(
                f"{name}: transformers' conversion made shape {list(tensor.shape)}, planned "
                f"{list(record.shape)}: report this with your transformers version"
            )
        return list(_to_store(tensor, record))

    with (
        _start(store_dir, paths, layout, config, fresh=earlier is None) as store,
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
        waiting.update(name for unit in todo for name in unit.tensors)
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


def _start(store_dir: str, paths: list[str], layout: ModelLayout, config, *, fresh: bool):
    """Make STORE_DIR and the store paths, probe O_DIRECT in each store path, copy the
    metadata, save model.json (complete=False) and open the store for writing. When ``fresh``
    (no earlier conversion) and a step fails, what this call made is taken back: the files it
    wrote into STORE_DIR, and the directories it created (mkdir by mkdir: none that another
    process made meanwhile), with what the store put in them."""
    from infinity.store import TieredStore

    made: list[str] = []
    wrote: list[str] = []
    try:
        for path in [*_missing_ancestors(store_dir), *paths]:
            _make_dir(path, made)
        for path in paths:
            reason = probe_direct_io(path)
            if reason is not None:
                raise StorageIOError(
                    path, 0, 0, errno.EINVAL,
                    f"the store cannot use O_DIRECT there ({reason}); give --nvme-path on a "
                    "filesystem that supports it (ext4 or xfs on an NVMe drive), not tmpfs, "
                    "overlayfs or a network filesystem",
                )  # fmt: skip
        _copy_metadata(layout.source["dir"], store_dir, wrote)
        wrote.append(os.path.join(store_dir, LAYOUT_FILE))
        layout.save(store_dir)
        return TieredStore.open(paths, config)
    except BaseException:
        if fresh:
            _take_back(wrote, made)
        raise


def _missing_ancestors(path: str) -> list[str]:
    """``path`` and its parents that do not exist, outermost first (what makedirs would make)."""
    missing = []
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing[::-1]


def _make_dir(path: str, made: list[str]) -> None:
    """mkdir ``path`` unless it exists; appended to ``made`` when this call created it."""
    try:
        os.mkdir(path)
    except FileExistsError:
        return
    except OSError as exc:
        raise StorageIOError(
            path, 0, 0, exc.errno or 0, f"cannot create the directory: {exc.strerror}"
        ) from None
    made.append(path)


def _take_back(files: list[str], dirs: list[str]) -> None:
    """Remove ``files``, then the directories in ``dirs`` (created by this conversion, so that
    all inside them is its own), innermost first; a failure to remove one is logged, not raised
    over the error that brought us here."""
    for path, remove in [
        *((f, os.remove) for f in files),
        *((d, shutil.rmtree) for d in dirs[::-1]),
    ]:
        try:
            remove(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s after the failed conversion: %s", path, exc)


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
) -> tuple[ModelLayout, dict[str, TensorSource | Conversion]]:
    """The layout a conversion writes (layout.plan over the checkpoint's headers, its names
    mapped onto the model's as from_pretrained maps them: ``keymap.match``), and where each
    stored parameter's bytes are: a checkpoint tensor, or a transformers Conversion of several;
    reads config.json and the safetensors headers only."""
    import transformers

    hf_dir = os.path.abspath(hf_dir)
    files, source = checkpoint_files(hf_dir)
    raw = load_json(member(hf_dir, "config.json"), "config.json", follow=False)
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
    header = read_headers(files)
    model = build_meta_model(config)
    find_layers(model)  # an architecture infinity cannot stream is refused before anything else
    keys = match(model, header)
    if keys.unused:
        log.info(
            "skipping %d checkpoint tensors that from_pretrained would not load into %s: %s",
            len(keys.unused), architecture_of(model), ", ".join(keys.unused[:10]),
        )  # fmt: skip
    layout, read_from = plan(model, keys.shapes, dtype, store_paths, source, keys.origin)
    return layout, {name: keys.sources[found] for name, found in read_from.items()}


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


def _check_destination(store_dir: str, paths: list[str]) -> None:
    """Refuse, before anything is written, what the store would refuse after model.json and
    the copies were written: STORE_DIR or a store path that exists but is no directory, one
    whose parent is missing (other than STORE_DIR, made first), the same directory given twice
    (by any name), a store path on tmpfs or ramfs (unless INFINITY_ALLOW_TMPFS=1)."""
    if os.path.lexists(store_dir) and not os.path.isdir(store_dir):
        raise ConfigError(f"STORE_DIR {store_dir} exists and is not a directory: give another")
    seen: dict[str, str] = {}  # real path (or inode) -> the path given
    for path in paths:
        if os.path.lexists(path) and not os.path.isdir(path):
            raise ConfigError(
                f"store path {path} exists and is not a directory: a store is a directory; give "
                "another --nvme-path"
            )
        parent = os.path.dirname(path)
        if not os.path.isdir(parent) and parent != store_dir:
            raise ConfigError(
                f"store path {path}: its parent {parent} does not exist; create it first (mkdir "
                "-p), or give another --nvme-path"
            )
        ident = os.path.realpath(path)
        if os.path.isdir(path):
            st = os.stat(path)
            ident = f"{st.st_dev}:{st.st_ino}"
        if ident in seen:
            same = "" if seen[ident] == path else f" ({seen[ident]} and {path} are one directory)"
            raise ConfigError(
                f"store path {path} is given twice{same}: each --nvme-path is its own directory, "
                "one per drive; give each once"
            )
        seen[ident] = path
        point, fstype, _ = mount_of(path)
        if fstype in MEMORY_FS and os.environ.get("INFINITY_ALLOW_TMPFS") != "1":
            raise ConfigError(
                f"store path {path} is on {fstype} (mounted at {point}): memory, not a disk; "
                "a store there costs RAM twice and is gone after a reboot. Give --nvme-path (or "
                "a STORE_DIR) on an NVMe drive (ext4 or xfs), or set INFINITY_ALLOW_TMPFS=1 for "
                "tests"
            )


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
    if overwrite and os.path.lexists(path):
        os.remove(path)
    return ModelLayout.load(store_dir, allow_incomplete=True) if os.path.lexists(path) else None


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


def _copy_metadata(hf_dir: str, store_dir: str, wrote: list[str]) -> None:
    """Copy the COPIED files present, appending each destination to ``wrote``; each must be a
    regular file inside the checkpoint (a symlink that leaves it, a FIFO, a device or a
    directory is refused, not skipped: a model without its tokenizer is broken too). The copy
    goes to a fresh NAME.tmp (O_EXCL, no link followed), fsync, rename."""
    for name in COPIED:
        if not os.path.lexists(os.path.join(hf_dir, name)):
            continue
        fd = open_config(member(hf_dir, name), name, follow=False)
        final = os.path.join(store_dir, name)
        tmp = final + ".tmp"
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # a leftover of a crash, or a planted link: the name only
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with os.fdopen(fd, "rb") as src, os.fdopen(os.open(tmp, flags, 0o644), "wb") as dst:
                shutil.copyfileobj(src, dst)
                dst.flush()
                os.fsync(dst.fileno())
            wrote.append(final)
            os.replace(tmp, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StorageIOError(
                final, 0, 0, exc.errno or 0, f"cannot copy {name} into STORE_DIR: {exc.strerror}"
            ) from None
