"""``load``: a transformers model, built on the meta device, whose weights stream from a store.

    model = load("llama-store", device="cuda", gpu_bytes="6GiB", pinned_bytes="40GiB")
    model = load("meta-llama/Llama-3.1-8B", max_memory={0: "6GiB", "cpu": "40GiB"})  # or a folder
    model(input_ids); model.generate(input_ids, max_new_tokens=32)  # the transformers API
    model.infinity.stats(); model.infinity.close()

Units: each decoder layer (``granularity="layer"``) or each module of a layer that owns weights
(``"matrix"``: norms, q/k/v/o, gate/up/down one by one; a smaller GPU working set, more steps).
Modules outside the layer list (embeddings, final norm, head) stay on the device when they fit
next to two streaming buffers of the largest unit, else they stream like layers. The streamed
units' sizes and forward order go to ``schedule.plan`` (repeated passes: static residency in
each tier, spread over the pass) and ``stream.Streamer`` executes it.
"""

from __future__ import annotations

import logging
import os
import re

import psutil
import torch

from infinity.config import format_size, parse_device, parse_size
from infinity.errors import ConfigError
from infinity.inference.layout import ModelLayout, build_meta_model, find_layers
from infinity.inference.stream import Slot, Streamer, StreamUnit, bind, unbind
from infinity.io import PinnedPool, bounce_bytes
from infinity.runtime import Executor, pack
from infinity.schedule import Bandwidths, plan, simulate
from infinity.store import StoreConfig, TieredStore

log = logging.getLogger(__name__)
GRANULARITIES = ("layer", "matrix")
# the order a decoder block of the Llama family runs its modules in ("matrix" granularity);
# modules not named here keep their definition order after these (the scheduler re-synchronises
# if the real order differs)
_BLOCK_ORDER = (
    "input_layernorm", "q_proj", "k_proj", "v_proj", "qkv_proj", "q_norm", "k_norm", "o_proj",
    "post_attention_layernorm", "pre_feedforward_layernorm", "gate_proj", "up_proj",
    "gate_up_proj", "down_proj", "post_feedforward_layernorm",
)  # fmt: skip


def load(
    source,
    device="cuda",
    gpu_bytes: int | str | None = None,
    pinned_bytes: int | str | None = None,
    *,
    store_dir=None,
    dtype: str = "auto",
    max_memory: dict | None = None,
    progress=None,
    revision: str | None = None,
    granularity: str = "layer",
    bandwidths: Bandwidths | None = None,
    verify_checksums: bool = True,
    aio=None,
    warm_up: bool | None = None,
):
    """A transformers model for ``source`` on ``device``, its weights streamed from a store.

    ``source``, as ``from_pretrained`` takes it: a store written by ``infinity convert``, a
    Hugging Face checkpoint folder, or a Hub model id (from the local cache when
    ``HF_HUB_OFFLINE=1``). A checkpoint is converted on first use (``resolve.resolve_store``) into
    ``store_dir``, by default ``$INFINITY_CACHE/NAME-DTYPE-HASH`` (``INFINITY_CACHE`` defaults to
    ``~/.cache/infinity``; a store needs a filesystem with O_DIRECT, so not tmpfs); later loads
    read that store. The conversion is convert's: ``dtype`` ("auto", "bf16", "fp8", ...), the
    same checks, resumable, ``progress(nbytes_done, nbytes_total, unit_name)`` after each unit;
    ``revision`` picks a Hub revision.

    ``gpu_bytes``: device memory for weights (resident units + streaming buffers; activations
    and the KV cache come on top); default half the free device memory (all of the model on the
    CPU). ``pinned_bytes``: the pinned tier (units kept in RAM + staging buffers); default the
    model's size, at most half the available RAM. ``max_memory`` spells both the way
    accelerate does, ``{0: "8GiB", "cpu": "60GiB"}``: the entry of the load device (its index,
    or "cuda:N") is ``gpu_bytes``, "cpu" is ``pinned_bytes``; ``gpu_bytes``/``pinned_bytes``
    given explicitly win over it, and it wins over the defaults. ``warm_up`` (default: on a CUDA
    device) runs one forward with placeholder weights before returning (see ``_warm_up``)."""
    from transformers import AutoConfig

    from infinity.inference.resolve import resolve_store

    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    dev = parse_device(device)
    if max_memory is not None:
        gpu_bytes, pinned_bytes = _max_memory(max_memory, dev, gpu_bytes, pinned_bytes)
    gpu_bytes, pinned_bytes = (  # a bad size is refused before a conversion of many minutes
        parse_size(b) if isinstance(b, str) else b for b in (gpu_bytes, pinned_bytes)
    )
    store_dir = resolve_store(source, store_dir, dtype, progress, revision)
    layout = ModelLayout.load(store_dir)
    compute = getattr(torch, layout.compute_dtype)
    config = AutoConfig.from_pretrained(store_dir)
    model = build_meta_model(config)
    _meta_params(model, compute)
    for module in model.modules():  # buffers (rotary frequencies) were built for real, on the CPU
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(dev)
    units = _units(model, layout, granularity)
    total = sum(u.nbytes for u in units)
    gpu_budget, pinned_budget = _budgets(dev, gpu_bytes, pinned_bytes, total)

    config = _store_config(verify_checksums, aio)  # no pinned tier: the executor's buffers
    # the process's one pinned pool: the executor's units and the aio engine's bounce buffers
    pool = PinnedPool(pinned_budget + bounce_bytes(config.aio))
    try:
        store = TieredStore.open(layout.store_paths, config, readonly=True, pool=pool)
    except BaseException:
        pool.close()
        raise
    try:
        _load_buffers(model, layout, store, dev)
        fixed, streamed = _place(units, gpu_budget)
        _bind_fixed(store, fixed, dev, compute)
        left = gpu_budget - sum(u.nbytes for u in fixed)
        if warm_up if warm_up is not None else dev.type == "cuda":
            _warm_up(model, streamed, dev, compute)
        p = _plan(streamed, left, pinned_budget, bandwidths)
        executor = Executor(
            store, [u.unit for u in streamed], p, dev, pool if pinned_budget else None
        )
        streamer = Streamer(executor, streamed, compute, store, pool)
        streamer.start_with(model)
    except BaseException:
        store.close()
        pool.close()
        raise
    log.info(
        "%s: %d units on %s, %d streamed (%s); %s",
        layout.architecture, len(fixed), dev, len(streamed), format_size(total), p,
    )  # fmt: skip
    _generation_config(model, store_dir)
    cls = type(model)  # transformers asks the first parameter for the device: it may be meta
    model.__class__ = type(cls.__name__, (cls,), {"device": property(lambda self: dev)})
    model.infinity = streamer
    return model


def _meta_params(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Parameters as meta tensors in the compute dtype (tied ones stay one object)."""
    seen: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is None:
                continue
            if id(p) not in seen:
                dt = dtype if p.is_floating_point() else p.dtype
                seen[id(p)] = torch.nn.Parameter(
                    torch.empty(p.shape, dtype=dt, device="meta"), requires_grad=False
                )
            module._parameters[name] = seen[id(p)]


def _units(model, layout: ModelLayout, granularity: str) -> list[StreamUnit]:
    """Every parameter, grouped into units in forward order, each with its store keys."""
    layers_path, _ = find_layers(model)
    prefix = layers_path + "."
    groups: dict[str, list[Slot]] = {}  # in named_parameters order
    missing = []
    for name, param in model.named_parameters(remove_duplicate=False):
        record = layout.tensors.get(layout.tied.get(name, name))
        if record is None:
            missing.append(name)
            continue
        owner, _, attr = name.rpartition(".")
        unit = owner
        if granularity == "layer" and owner.startswith(prefix):
            unit = prefix + owner[len(prefix) :].split(".")[0]
        groups.setdefault(unit, []).append(Slot(model.get_submodule(owner), attr, record, param))
    if missing:
        raise ConfigError(
            f"the store has no tensors for {len(missing)} parameters of {layout.architecture} "
            f"(e.g. {missing[:3]}); convert the checkpoint again with this version of infinity"
        )
    names = list(groups)
    first_layer = next((j for j, u in enumerate(names) if u.startswith(prefix)), len(names))

    def layer_of(unit: str) -> int | None:
        return int(unit[len(prefix) :].split(".")[0]) if unit.startswith(prefix) else None

    def rank(unit: str) -> tuple:
        j, layer = names.index(unit), layer_of(unit)
        if layer is None:  # before or after the layers
            return (0 if j < first_layer else 2, j)
        leaf = unit[len(prefix) :].split(".")[-1]
        pos = _BLOCK_ORDER.index(leaf) if leaf in _BLOCK_ORDER else len(_BLOCK_ORDER)
        return (1, layer, pos, j)

    records = {r.key: r for r in layout.tensors.values()}  # fp8 scales have their own
    units = []
    for name in sorted(names, key=rank):
        slots = groups[name]
        keys = [s.record.key for s in slots]
        keys += [s.record.scale_key for s in slots if s.record.scale_key is not None]
        unit = pack(name, [(k, getattr(torch, records[k].dtype), records[k].shape) for k in keys])
        units.append(StreamUnit(unit, model.get_submodule(name), slots, layer_of(name)))
    return units


def _max_memory(max_memory, dev, gpu_bytes, pinned_bytes):
    """(gpu_bytes, pinned_bytes) from accelerate's spelling; explicit values win."""
    if not isinstance(max_memory, dict):
        raise ConfigError(
            f'max_memory must be a dict like {{0: "8GiB", "cpu": "60GiB"}}, got {max_memory!r}'
        )
    gpus: dict[int, object] = {}
    for key, value in max_memory.items():
        index = _device_index(key)
        if index is not None:
            gpus[index] = value
        elif key != "cpu":
            raise ConfigError(
                f"max_memory key {key!r} is not understood: use the device index (0) or 'cuda:N' "
                "for the GPU's memory and 'cpu' for the pinned host memory ('disk' is the store)"
            )
    if gpus and (dev.type != "cuda" or dev.index not in gpus):
        raise ConfigError(
            f"max_memory gives memory for GPU {sorted(gpus)}, but load runs on {dev} (streamed "
            "inference uses one device): give that device's entry (none on the CPU) and 'cpu'"
        )
    gpu = gpu_bytes if gpu_bytes is not None else gpus.get(dev.index) if gpus else None
    pinned = pinned_bytes if pinned_bytes is not None else max_memory.get("cpu")
    return gpu, pinned


def _device_index(key) -> int | None:
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return key
    match = re.fullmatch(r"cuda:(\d+)", key) if isinstance(key, str) else None
    return int(match.group(1)) if match else None


def _budgets(dev, gpu: int | None, pinned: int | None, total: int) -> tuple[int, int]:
    if gpu is None:
        gpu = torch.cuda.mem_get_info(dev)[0] // 2 if dev.type == "cuda" else total
    if pinned is None:
        pinned = min(total, psutil.virtual_memory().available // 2)
    return int(gpu), int(pinned)


def _store_config(verify: bool, aio) -> StoreConfig:
    kw = {"aio": aio} if aio is not None else {}
    return StoreConfig(gpu_bytes=0, pinned_bytes=0, verify_checksums=verify, **kw)


def _plan(units: list[StreamUnit], gpu_bytes: int, pinned_bytes: int, bandwidths):
    """Passes repeat: static residency. Pinned staging of one or two buffers, whichever the
    simulation finds faster (two keep the disk busy while one is copied); none (disk straight
    to the device, slower) only when the pinned budget cannot hold a unit."""
    sizes = [u.nbytes for u in units]
    options = [b for b in (2, 1) if pinned_bytes >= b * max(sizes)] or [0]
    plans = [
        plan(sizes, list(range(len(units))), gpu_bytes=gpu_bytes, pinned_bytes=pinned_bytes,
             bandwidths=bandwidths, repeats=2, pinned_stream_buffers=b)
        for b in options
    ]  # fmt: skip
    return min(plans, key=lambda p: simulate(p).time_s)


def _place(units: list[StreamUnit], gpu_bytes: int):
    """Units outside the layers stay on the device while they fit beside two streaming buffers
    of the largest layer unit (smallest first); everything else streams."""
    largest = max((u.nbytes for u in units if u.layer is not None), default=0)
    room = gpu_bytes - 2 * largest
    fixed = []
    for u in sorted((u for u in units if u.layer is None), key=lambda u: u.nbytes):
        if u.nbytes <= room:
            fixed.append(u)
            room -= u.nbytes
    streamed = [u for u in units if u not in fixed]
    if not any(u.layer is not None for u in streamed):
        raise ConfigError("nothing to stream: the model has no decoder layers")
    return fixed, streamed


def _bind_fixed(store, units: list[StreamUnit], dev, dtype) -> None:
    cache: dict[str, torch.Tensor] = {}  # tied weights: one copy
    for unit in units:
        for key in unit.keys:
            if key not in cache:
                cache[key] = store.get(key, device=dev)
        bind(unit.slots, cache, dtype)


def _load_buffers(model, layout: ModelLayout, store, dev) -> None:
    """The persistent buffers the checkpoint held (layout.py), read once, in each buffer's own
    dtype (as from_pretrained casts them to the model's)."""
    for name in layout.buffers:
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        current = module._buffers.get(attr)
        if current is None:
            raise ConfigError(
                f"the store holds buffer {name}, which {layout.architecture} built by this "
                "transformers lacks: convert the checkpoint again with this version"
            )
        value = store.get(layout.tensors[name].key)
        module._buffers[attr] = value.to(device=dev, dtype=current.dtype)


def _warm_up(model, units: list[StreamUnit], dev, dtype, tokens: int = 8) -> None:
    """One forward in which every streamed unit reads zeros from one scratch buffer of the
    largest unit's size (bound per unit by hooks, so fp8 dequantises one unit at a time). CUDA
    loads kernels lazily, from library files on the disk the stream reads (cold after a page
    cache drop): without this the first real forward pays that, ~1 s, inside its pipeline. No
    weights are read, and the scratch memory is left cached for the streaming buffers."""
    scratch = torch.zeros(max(u.nbytes for u in units), dtype=torch.uint8, device=dev)
    handles = []
    for u in units:
        tensors = u.views(scratch)
        handles.append(
            u.module.register_forward_pre_hook(lambda m, a, u=u, t=tensors: bind(u.slots, t, dtype))
        )
        handles.append(u.module.register_forward_hook(lambda m, a, o, u=u: unbind(u.slots)))
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros((1, tokens), dtype=torch.long, device=dev), use_cache=False)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    finally:
        for h in handles:
            h.remove()
        for u in units:
            unbind(u.slots)


def _generation_config(model, store_dir) -> None:
    if os.path.exists(os.path.join(store_dir, "generation_config.json")):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(store_dir)
