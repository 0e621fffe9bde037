"""What a converted model looks like in its store: one record per tensor, grouped in units.

A *unit* is what streams as one: a decoder layer (``model.layers.7``) or a module outside the
layer list (``model.embed_tokens``, ``model.norm``, ``lm_head``). ``STORE_DIR/model.json`` holds
the ``ModelLayout``; the tensors live in a TieredStore at ``layout.store_paths``, each unit's
tensors written one after another in ``Unit.tensors`` order (an fp8 weight's scale right after
its weight), so that a layer is one contiguous run of the data file.

``plan`` computes a layout from the meta model and the checkpoint's tensor names, dtypes and
shapes (pure: convert.py does the reading and writing).

Choices the format makes:
- Tied parameters are stored once, under the name that comes first in ``named_parameters()``;
  ``tied`` maps each other name to it. A unit whose parameters are all tied to another unit's
  (a tied ``lm_head``) stays in ``units`` at its place in the forward order, with no tensors and
  ``nbytes`` 0: the loader must make the tied tensor available there.
- ``Unit.tensors`` lists parameters only. An fp8 weight's scale is a stored tensor too: it has
  its own record in ``tensors`` (key ``name + ".scale"``, same unit), reached from the weight's
  ``scale_key``; ``unit_keys`` gives every store key of a unit in storage order.
- In model.json, store paths inside STORE_DIR are written relative to it (the directory can be
  moved); ``ModelLayout.store_paths`` is always absolute.
- Persistent buffers whose values the checkpoint holds (a MoE router's
  ``e_score_correction_bias``, Gemma 4's ``layer_scalar``, Apertus' activation parameters) are
  stored too, in their module's unit, as the checkpoint has them (never cast or quantized);
  ``buffers`` names them. ``load`` copies them into the model once: they do not stream. A layout
  without the field (older infinity) has none.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from infinity.errors import ConfigError
from infinity.files import load_json, open_config

log = logging.getLogger(__name__)

LAYOUT_FILE = "model.json"
LAYOUT_FORMAT = "infinity-model"
LAYOUT_VERSION = 1
MAX_LAYOUT_BYTES = 1 << 30  # model.json: ~300 bytes a tensor; 100k tensors make 30 MB
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16", "fp8")
CASTS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class TensorRecord:
    """One stored tensor: its HF name, store key, stored dtype/shape/bytes, unit, fp8 scale."""

    name: str
    key: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    unit: str
    scale_key: str | None = None


@dataclass(frozen=True)
class Unit:
    """A decoder layer or a module outside the layers; ``nbytes`` counts its scales too."""

    name: str
    tensors: tuple[str, ...]
    nbytes: int
    layer: int | None


@dataclass
class ModelLayout:
    version: int
    dtype: str
    compute_dtype: str
    architecture: str
    layers_path: str
    units: list[Unit]
    tensors: dict[str, TensorRecord]
    tied: dict[str, str]
    store_paths: list[str]
    complete: bool = False
    source: dict = field(default_factory=dict)
    buffers: list[str] = field(default_factory=list)

    def unit_keys(self, unit: str) -> list[str]:
        """Every store key of ``unit`` in storage order (each fp8 weight followed by its scale)."""
        found = [u for u in self.units if u.name == unit]
        if not found:
            raise ConfigError(f"no unit {unit!r} in this layout ({len(self.units)} units)")
        keys = []
        for name in found[0].tensors:
            record = self.tensors[name]
            keys.append(record.key)
            if record.scale_key is not None:
                keys.append(record.scale_key)
        return keys

    def to_dict(self, store_dir: str | os.PathLike | None = None) -> dict[str, Any]:
        base = os.path.abspath(store_dir) if store_dir is not None else None
        paths = [_relative_if_inside(p, base) for p in self.store_paths]
        return {
            "format": LAYOUT_FORMAT,
            "version": self.version,
            "dtype": self.dtype,
            "compute_dtype": self.compute_dtype,
            "architecture": self.architecture,
            "layers_path": self.layers_path,
            "units": [asdict(u) for u in self.units],
            "tensors": {name: asdict(r) for name, r in self.tensors.items()},
            "tied": dict(self.tied),
            "store_paths": paths,
            "complete": self.complete,
            "source": self.source,
            "buffers": list(self.buffers),
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any], store_dir: str | os.PathLike) -> ModelLayout:
        base = os.path.abspath(store_dir)
        return cls(
            version=int(doc["version"]),
            dtype=doc["dtype"],
            compute_dtype=doc["compute_dtype"],
            architecture=doc["architecture"],
            layers_path=doc["layers_path"],
            units=[
                Unit(u["name"], tuple(u["tensors"]), int(u["nbytes"]), u["layer"])
                for u in doc["units"]
            ],
            tensors={
                name: TensorRecord(**{**r, "shape": tuple(r["shape"])})
                for name, r in doc["tensors"].items()
            },
            tied=dict(doc["tied"]),
            store_paths=[os.path.normpath(os.path.join(base, p)) for p in doc["store_paths"]],
            complete=bool(doc["complete"]),
            source=dict(doc.get("source", {})),
            buffers=list(doc.get("buffers", [])),
        )

    @classmethod
    def load(cls, store_dir: str | os.PathLike, *, allow_incomplete: bool = False) -> ModelLayout:
        """The layout of a converted model; ConfigError when there is none, it is incomplete
        (unless ``allow_incomplete``), damaged, or written by a newer infinity. model.json (and,
        for a complete model, config.json) must be regular files, not links or FIFOs."""
        store_dir = os.path.abspath(store_dir)
        path = os.path.join(store_dir, LAYOUT_FILE)
        hint = f"run `infinity convert HF_DIR {store_dir}` first"
        if not os.path.lexists(store_dir):
            raise ConfigError(f"{store_dir} does not exist: it is not a converted model; {hint}")
        if not os.path.isdir(store_dir):
            raise ConfigError(
                f"{store_dir} is not a directory: it is not a converted model; {hint}"
            )
        if not os.path.lexists(path):
            raise ConfigError(
                f"{store_dir} has no {LAYOUT_FILE}: it is not a converted model (or its "
                f"conversion never started); {hint}"
            )
        doc = load_json(path, LAYOUT_FILE, MAX_LAYOUT_BYTES, follow=False)
        if not isinstance(doc, dict) or doc.get("format") != LAYOUT_FORMAT:
            raise ConfigError(f"{path} is not an infinity model layout (no format {LAYOUT_FORMAT})")
        version = doc.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ConfigError(f"{path} is damaged: its version is {version!r}, not a number")
        if version > LAYOUT_VERSION:
            raise ConfigError(
                f"{path} was written by a newer infinity (layout version {doc['version']}; this "
                f"one reads up to {LAYOUT_VERSION}): upgrade infinity to open it"
            )
        try:
            layout = cls.from_dict(doc, store_dir)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(
                f"{path} is damaged or incomplete ({exc!r}): run `infinity convert HF_DIR "
                f"{store_dir} --overwrite` to convert again"
            ) from None
        if not layout.complete and not allow_incomplete:
            source = layout.source.get("dir", "HF_DIR")
            paths = layout.store_paths
            nvme = "" if paths == [os.path.join(store_dir, "data")] else "".join(
                f" --nvme-path {p}" for p in paths
            )  # fmt: skip
            raise ConfigError(
                f"the conversion in {store_dir} is incomplete (interrupted, or it failed): run "
                f"`infinity convert {source} {store_dir} --dtype {layout.dtype}{nvme}` again to "
                "finish it"
            )
        if not allow_incomplete:  # load() hands it to transformers: no FIFO, no link there
            config = os.path.join(store_dir, "config.json")
            if not os.path.lexists(config):
                raise ConfigError(
                    f"{store_dir} has no config.json (convert copies it from the checkpoint): "
                    f"copy {layout.source.get('dir', 'HF_DIR')}/config.json into {store_dir}"
                )
            os.close(open_config(config, "config.json", follow=False))
        return layout

    def save(self, store_dir: str | os.PathLike) -> None:
        """Write STORE_DIR/model.json atomically (tmp, fsync, rename, fsync the directory)."""
        from infinity.store.manifest import write_atomic

        payload = json.dumps(self.to_dict(store_dir), indent=1).encode() + b"\n"
        write_atomic(os.path.abspath(store_dir), LAYOUT_FILE, payload)


def _relative_if_inside(path: str, base: str | None) -> str:
    path = os.path.abspath(path)
    if base is not None and os.path.commonpath([path, base]) == base:
        return os.path.relpath(path, base)
    return path


def find_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The dotted path and the ModuleList of the decoder layers: the one ModuleList of
    ``num_hidden_layers`` modules (ModuleLists nested inside it, e.g. experts, do not count)."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    arch = architecture_of(model)
    count = getattr(text, "num_hidden_layers", None)
    if not isinstance(count, int):
        raise ConfigError(f"{arch} is not supported: its config has no num_hidden_layers")
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) == count
    ]
    found = [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found)]
    if len(found) != 1:
        names = ", ".join(n for n, _ in found) or "none"
        raise ConfigError(
            f"{arch} is not supported: its decoder blocks are not one nn.ModuleList "
            f"(ModuleLists of num_hidden_layers={count} modules: {names})"
        )
    return found[0]


def architecture_of(model: torch.nn.Module) -> str:
    archs = getattr(model.config, "architectures", None)
    return archs[0] if archs else type(model).__name__


def build_meta_model(config, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The transformers model of ``config`` (a PretrainedConfig or a checkpoint directory) with
    its parameters on the meta device, buffers real on the CPU, tied weights tied, in eval mode.
    ``dtype`` casts the floating parameters (buffers keep theirs: rotary tables stay float32)."""
    import transformers
    from accelerate import init_empty_weights

    if isinstance(config, str | os.PathLike):
        config = transformers.AutoConfig.from_pretrained(os.fspath(config))
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    with init_empty_weights(include_buffers=False):
        if cls is not None and hasattr(cls, "_from_config"):
            model = cls._from_config(config)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # transformers 5 does not tie under init_empty_weights by itself
    if dtype is not None:
        cast: dict[int, tuple] = {}  # id -> (old, new): tied parameters stay one
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.is_floating_point() and p.dtype != dtype:
                    if id(p) not in cast:
                        cast[id(p)] = (p, torch.nn.Parameter(p.to(dtype), p.requires_grad))
                    module._parameters[name] = cast[id(p)][1]
    return model.eval()


def plan(
    model: torch.nn.Module,
    checkpoint: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    dtype: str = "auto",
    store_paths: list[str] | None = None,
    source: dict | None = None,
    origin: Callable[[str], str] = str,
) -> tuple[ModelLayout, dict[str, str]]:
    """The layout of ``model`` (built by build_meta_model) stored from a checkpoint whose tensors
    have these dtypes and shapes, and the checkpoint name each stored parameter is read from.
    ``checkpoint`` names tensors as the model does (``keymap.match`` renamed them as
    from_pretrained would); ``origin(name)`` says which checkpoint tensor that was, for messages.
    Nothing is read: this is the plan that convert executes."""
    if dtype not in DTYPE_CHOICES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}; got {dtype!r}")
    arch = architecture_of(model)
    layers_path, layers = find_layers(model)
    params = list(model.named_parameters(remove_duplicate=False))
    first_name: dict[int, str] = {}
    tied: dict[str, str] = {}  # stored once, under the name met first
    for name, p in params:
        if first_name.setdefault(id(p), name) != name:
            tied[name] = first_name[id(p)]
    aliases: dict[str, list[str]] = {}
    for alias, target in tied.items():
        aliases.setdefault(target, []).append(alias)

    read_from: dict[str, str] = {}
    missing = []
    for name, p in params:
        if name in tied:
            continue
        found = next((n for n in (name, *aliases.get(name, ())) if n in checkpoint), None)
        if found is None:
            missing.append(name)
            continue
        ck_dtype, shape = checkpoint[found]
        if shape != tuple(p.shape):
            raise ConfigError(
                f"checkpoint tensor {origin(found)} has shape {list(shape)}; {arch} built from "
                f"config.json expects {list(p.shape)}: the checkpoint does not match its config"
            )
        if ck_dtype in FP8_DTYPES:
            raise ConfigError(
                f"checkpoint tensor {origin(found)} is {ck_dtype}: quantized checkpoints are not "
                "supported; convert the original bf16/fp16 checkpoint (--dtype fp8 quantizes)"
            )
        read_from[name] = found
    if missing:
        raise ConfigError(_missing_message(missing, list(checkpoint), arch))
    buffers = _held_buffers(model, checkpoint, origin)
    read_from.update((name, name) for name in buffers)
    skipped = sorted(set(checkpoint) - set(read_from.values()))
    if skipped:
        log.info(
            "skipping %d checkpoint tensors that are not parameters of %s (or are copies of "
            "tied ones): %s", len(skipped), arch, ", ".join(skipped[:10])
        )  # fmt: skip

    # units in forward order: those met before the layer list, the layers, the rest
    prefix = layers_path + "."
    members: dict[str, list[str]] = {f"{prefix}{i}": [] for i in range(len(layers))}
    before, after, seen_layers = [], [], False
    for name in _in_module_order(model, buffers):
        if name.startswith(prefix):
            unit, seen_layers = prefix + name[len(prefix) :].split(".", 1)[0], True
        else:
            unit = name.rpartition(".")[0]
            if unit not in members:
                (after if seen_layers else before).append(unit)
                members[unit] = []
        if name not in tied:
            members[unit].append(name)
    order = before + [f"{prefix}{i}" for i in range(len(layers))] + after

    float_bytes: Counter = Counter()
    for found in read_from.values():
        ck_dtype, shape = checkpoint[found]
        if ck_dtype.is_floating_point:
            float_bytes[ck_dtype] += _nbytes(ck_dtype, shape)
    checkpoint_dtype = float_bytes.most_common(1)[0][0] if float_bytes else torch.float32
    compute = {"auto": checkpoint_dtype, "fp8": torch.bfloat16}.get(dtype) or CASTS[dtype]

    records: dict[str, TensorRecord] = {}
    units = []
    for unit in order:
        layer = int(unit[len(prefix) :]) if unit.startswith(prefix) else None
        for name in members[unit]:
            ck_dtype, shape = checkpoint[read_from[name]]
            quantize = dtype == "fp8" and layer is not None and len(shape) == 2
            quantize = quantize and ck_dtype.is_floating_point and name not in buffers
            target = ck_dtype if name in buffers else _stored_dtype(ck_dtype, dtype, quantize)
            scale_key = name + ".scale" if quantize else None
            records[name] = TensorRecord(
                name, name, _name(target), shape, _nbytes(target, shape), unit, scale_key
            )
            if scale_key is not None:
                if scale_key in checkpoint or scale_key in records:
                    raise ConfigError(f"{arch} has a tensor {scale_key!r}: fp8 needs that key")
                rows = (shape[0],)
                records[scale_key] = TensorRecord(
                    scale_key, scale_key, "float32", rows, 4 * shape[0], unit, None
                )
        nbytes = sum(r.nbytes for r in records.values() if r.unit == unit)
        units.append(Unit(unit, tuple(members[unit]), nbytes, layer))
    layout = ModelLayout(
        version=LAYOUT_VERSION,
        dtype=dtype,
        compute_dtype=_name(compute),
        architecture=arch,
        layers_path=layers_path,
        units=units,
        tensors=records,
        tied=tied,
        store_paths=list(store_paths or []),
        complete=False,
        source=dict(source or {}),
        buffers=list(buffers),
    )
    return layout, read_from


def _held_buffers(model: torch.nn.Module, checkpoint: dict, origin) -> list[str]:
    """The persistent buffers of ``model`` whose values the checkpoint holds (from_pretrained
    loads those; the others keep the values the model computes), shapes checked."""
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    held = []
    for name, buf in model.state_dict(keep_vars=True).items():
        if name in params or name not in checkpoint:
            continue
        shape = checkpoint[name][1]
        if shape != tuple(buf.shape):
            raise ConfigError(
                f"checkpoint tensor {origin(name)} has shape {list(shape)}; "
                f"{architecture_of(model)} built from config.json expects {list(buf.shape)}: "
                "the checkpoint does not match its config"
            )
        held.append(name)
    return held


def _in_module_order(model: torch.nn.Module, buffers: list[str]) -> list[str]:
    """Parameter names (tied ones under each name) and ``buffers``, module by module, in the
    order of ``named_parameters``."""
    wanted, names = set(buffers), []
    for path, module in model.named_modules(remove_duplicate=False):
        dotted = path + "." if path else ""
        names += [dotted + n for n, p in module._parameters.items() if p is not None]
        names += [dotted + n for n in module._buffers if dotted + n in wanted]
    return names


def _stored_dtype(ck_dtype: torch.dtype, dtype: str, quantize: bool) -> torch.dtype:
    if not ck_dtype.is_floating_point or dtype == "auto":
        return ck_dtype
    if dtype == "fp8":
        return torch.float8_e4m3fn if quantize else torch.bfloat16
    return CASTS[dtype]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count * torch.empty((), dtype=dtype).element_size()


def _missing_message(missing: list[str], names: list[str], arch: str) -> str:
    shown = ", ".join(missing[:10]) + (
        f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    )
    head = f"the checkpoint lacks {len(missing)} parameters of {arch} (from config.json): {shown}"
    want = missing[0]
    for have in names:
        if want.endswith("." + have) or have.endswith("." + want):
            lacks = want.endswith("." + have)
            prefix = want[: -len(have)] if lacks else have[: -len(want)]
            return (
                f"{head}. Its names {'lack' if lacks else 'carry'} the prefix {prefix!r} "
                f"({have!r} for {want!r}): it was saved from another model class, and "
                f"transformers' renaming for {arch} does not map it: save the checkpoint again "
                f"from {arch}"
            )
    return head + (
        ": the checkpoint does not match its config.json (from_pretrained would load it with "
        "those initialised at random)"
    )
