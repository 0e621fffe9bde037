"""The systems bench/forward.py compares ours with, each on the synthetic checkpoint, each run by
``run_<name>(ctx)`` (ctx: forward.Ctx) that adds rows to ``ctx.result``:

- bounds: the machine's limits measured in the same run (cold O_DIRECT disk read, pinned -> GPU
  copy) and the compute floor (every weight resident on the device).
- accelerate: ``from_pretrained(device_map=...)`` with every decoder layer on ``"disk"``.
- airllm: AirLLM's method without the airllm package: each layer's own safetensors file loaded to
  the device just before the layer runs and dropped after it; optionally a one-layer prefetch.
- deepspeed: ZeRO-3 with ``offload_param`` to NVMe (pin_memory on, its aio section set).
"""

from __future__ import annotations

import gc
import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch
from _measure import GIB, decode, disk_read_gbps, free_port, h2d_gbps, remove
from _synth import dir_bytes, layer_file, shard_names


def dtype_kw() -> dict:
    """transformers >= 4.56 takes ``dtype``; older ones ``torch_dtype``."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch.bfloat16}


def forward_fn(model, ids):
    """One prefill forward of ``model`` on ``ids`` (no KV cache), as a no-argument callable."""
    return partial(_forward, model, ids)


def _forward(model, ids):
    return model(input_ids=ids, use_cache=False)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _decode_rows(ctx, name: str, model, **fields) -> None:
    if not ctx.decodes(ctx.system):
        return
    a = ctx.args
    for batch in a.decode_batches:
        try:
            r = decode(model, ctx.shape.vocab, batch, a.prompt, a.new_tokens, ctx.device)
        except Exception as exc:  # noqa: BLE001 - recorded; the passes stand
            ctx.error(f"{name}, decode batch {batch}", exc, traceback.format_exc())
            continue
        ctx.add_row({"name": f"{name}, decode batch {batch}", **fields, **r})


def run_bounds(ctx) -> None:
    a, shape = ctx.args, ctx.shape
    files = [layer_file(ctx.ckpt, shape, i) for i in range(shape.layers)]
    disk = disk_read_gbps(files, a.disk_probe_bytes, ctx.cold_paths)
    ctx.result["limits"] = {"disk": disk, "h2d": h2d_gbps(ctx.device)}
    ctx.log(f"disk read {disk['gbps']:.2f} GB/s ({disk['method']})")
    if ctx.result["limits"]["h2d"]:
        ctx.log(f"pinned -> GPU {ctx.result['limits']['h2d']['gbps']:.1f} GB/s")
    ctx.save()
    total = shape.weight_bytes + shape.nonlayer_bytes
    if ctx.device.type == "cuda":
        room = torch.cuda.mem_get_info(ctx.device)[0] - 4 * GIB
    else:
        import psutil

        room = psutil.virtual_memory().available // 2
    if total > room:
        ctx.note(f"compute floor skipped: {total / 1e9:.1f} GB of weights do not fit")
        return
    from transformers import AutoModelForCausalLM

    dev = (ctx.device.index or 0) if ctx.device.type == "cuda" else "cpu"
    model = AutoModelForCausalLM.from_pretrained(ctx.ckpt, device_map={"": dev}, **dtype_kw())
    model.eval()
    ids = ctx.ids(1)
    fwd = forward_fn(model, ids)
    with torch.no_grad():
        for _ in range(2):
            fwd()
        ctx.passes(
            "all layers resident (compute floor)",
            fwd,
            a.floor_repeats,
            cold=False,
            weight_bytes=shape.weight_bytes,
            floor=True,
        )
        _decode_rows(ctx, "all layers resident", model, floor=True)
    del model, fwd
    _free(ctx.device)


def _device_map(model, main) -> dict:
    """Every module outside the decoder layers on ``main``, each decoder layer on disk."""
    dm = {}
    for name, child in model.named_children():
        inner = getattr(child, "layers", None)
        if isinstance(inner, torch.nn.ModuleList):
            for sub, _ in child.named_children():
                if sub == "layers":
                    dm.update({f"{name}.layers.{i}": "disk" for i in range(len(inner))})
                else:
                    dm[f"{name}.{sub}"] = main
        else:
            dm[name] = main
    return dm


def run_accelerate(ctx) -> None:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = ctx.shape
    main = (ctx.device.index or 0) if ctx.device.type == "cuda" else "cpu"
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ctx.ckpt))
    dm = _device_map(skeleton, main)
    del skeleton
    offload = os.path.join(ctx.work, "accelerate-offload")
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        ctx.ckpt, device_map=dm, offload_folder=offload, **dtype_kw()
    )
    model.eval()
    ctx.result["info"] = {
        "load_s": time.perf_counter() - start,
        "device_map": dm,
        "offload_folder_bytes": dir_bytes(offload),  # 0: it reads the safetensors shards in place
    }
    ids = ctx.ids(1)
    fwd = forward_fn(model, ids)
    w = shape.weight_bytes
    with torch.no_grad():
        ctx.passes("accelerate disk offload, cold", fwd, 1, weight_bytes=w)
        ctx.passes("accelerate, page cache warm", fwd, 1, cold=False, weight_bytes=w, c_ram_bytes=w)
        _decode_rows(ctx, "accelerate (page cache warm)", model, weight_bytes=w, c_ram_bytes=w)
    del model, fwd
    _free(ctx.device)
    remove(offload)


class _LayerLoader:
    """Forward hooks that bind a layer's weights, read from its own file, just before it runs,
    and put meta tensors back after it (AirLLM's loop, as hooks: the model's own forward and
    ``generate`` run unchanged)."""

    def __init__(self, model, layers, files: list[str], device: torch.device, prefetch: bool):
        self.layers, self.files, self.device = layers, files, device
        self.pool = ThreadPoolExecutor(1) if prefetch else None
        self.ahead: dict[int, object] = {}
        self.meta = {i: dict(layer.named_parameters()) for i, layer in enumerate(layers)}
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda m, args, i=i: self.bind(i))
            layer.register_forward_hook(lambda m, args, out, i=i: self.unbind(i))

    def _read(self, i: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        sd = load_file(self.files[i], device="cpu")
        if self.pool is not None and self.device.type == "cuda":  # AirLLM pins what it prefetches
            sd = {k: t.pin_memory() for k, t in sd.items()}
        return sd

    def bind(self, i: int) -> None:
        fut = self.ahead.pop(i, None)
        sd = fut.result() if fut is not None else self._read(i)
        if self.pool is not None and i + 1 < len(self.layers):  # none across passes
            self.ahead[i + 1] = self.pool.submit(self._read, i + 1)
        prefix = f"{self._prefix}{i}."
        for name in self.meta[i]:
            t = sd[prefix + name].to(self.device, non_blocking=True)
            _set(self.layers[i], name, torch.nn.Parameter(t, requires_grad=False))

    def unbind(self, i: int) -> None:
        for name, meta in self.meta[i].items():
            _set(self.layers[i], name, meta)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.ahead.clear()

    _prefix = "model.layers."


def _set(module: torch.nn.Module, name: str, value) -> None:
    owner, _, attr = name.rpartition(".")
    target = module.get_submodule(owner) if owner else module
    if isinstance(value, torch.nn.Parameter):
        target._parameters[attr] = value
    else:
        target._buffers[attr] = value


def run_airllm(ctx) -> None:
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    shape, dev = ctx.shape, ctx.device
    names = shard_names(shape)
    files = [layer_file(ctx.ckpt, shape, i) for i in range(shape.layers)]
    w = shape.weight_bytes
    ctx.result["info"] = {
        "layer_files": "the synthetic checkpoint has one shard per decoder layer: those shards "
        "are the per-layer files (no split copy); embeddings, norm and head stay on the device"
    }
    for variant in ctx.args.airllm_variants:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(ctx.ckpt), **dtype_kw()
            )
        model.eval()
        for module in model.modules():  # rotary frequencies: real buffers, to the device
            for bname, buf in list(module._buffers.items()):
                if buf is not None:
                    module._buffers[bname] = buf.to(dev)
        for shard in (names[0], names[-1]):
            for k, t in load_file(os.path.join(ctx.ckpt, shard), device="cpu").items():
                _set(model, k, torch.nn.Parameter(t.to(dev), requires_grad=False))
        loader = _LayerLoader(model, model.model.layers, files, dev, variant == "prefetch")
        ids = ctx.ids(1)
        fwd = forward_fn(model, ids)
        label = "per-layer files (AirLLM's method)" + (
            " + 1-layer prefetch thread" if variant == "prefetch" else ""
        )
        try:
            with torch.no_grad():
                ctx.passes(f"{label}, cold", fwd, ctx.args.airllm_passes, weight_bytes=w)
                if variant == ctx.args.airllm_variants[0]:
                    _decode_rows(ctx, label, model, weight_bytes=w)
        finally:
            loader.close()
        del model, loader, fwd
        _free(dev)


def _ds_config(ctx, nvme: str) -> dict:
    a, shape = ctx.args, ctx.shape
    largest = max(shape.vocab * shape.hidden, shape.intermediate * shape.hidden)
    buffer_size = a.ds_buffer_size or int(max(largest * 1.05, min(3e8, 4 * largest)))
    return {
        "train_micro_batch_size_per_gpu": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {
            "stage": 3,
            "offload_param": {
                "device": "nvme",
                "nvme_path": nvme,
                "pin_memory": True,
                "buffer_count": 5,
                "buffer_size": buffer_size,
            },
            "stage3_param_persistence_threshold": 0,
            "stage3_prefetch_bucket_size": int(2e9),
            "stage3_max_live_parameters": int(3e9),
        },
        "aio": {
            "block_size": a.ds_block_size,
            "queue_depth": 32,
            "intra_op_parallelism": 8,
            "single_submit": False,
            "overlap_events": True,
        },
    }


def run_deepspeed(ctx) -> None:
    for key, value in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", str(free_port())),
    ):
        os.environ.setdefault(key, value)
    # zero.Init patches tensor constructors: import what transformers loads lazily (torch._dynamo
    # via its masking utils) before entering it, or that import fails inside.
    import deepspeed
    import torch._dynamo  # noqa: F401
    import transformers.generation  # noqa: F401
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.llama import modeling_llama  # noqa: F401

    shape, dev = ctx.shape, ctx.device
    nvme = os.path.join(ctx.work, "deepspeed-nvme")
    remove(nvme)
    os.makedirs(nvme)
    cfg = _ds_config(ctx, nvme)
    deepspeed.init_distributed(dist_backend="nccl" if dev.type == "cuda" else "gloo")
    hf = AutoConfig.from_pretrained(ctx.ckpt)
    hf.pad_token_id = None  # transformers zeroes the padding row at init: not on a partition
    start = time.perf_counter()
    with deepspeed.zero.Init(
        config_dict_or_path=cfg, remote_device="nvme", pin_memory=True, dtype=torch.bfloat16
    ):
        model = AutoModelForCausalLM.from_config(hf, **dtype_kw())
    info = {"config": cfg, "init_s": time.perf_counter() - start, "weights": "random (zero.Init)"}
    ctx.result["info"] = info
    if ctx.args.ds_weights == "load":
        start = time.perf_counter()
        for shard in shard_names(shape):
            sd = load_file(os.path.join(ctx.ckpt, shard), device="cpu")
            for n, t in sd.items():  # one tensor at a time: a layer needs more swap buffers (7)
                p = model.get_parameter(n)  # than offload_param has (5)
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    p.data.copy_(t)
            del sd
        info.update(
            weights="checkpoint (GatheredParameters per tensor)", load_s=time.perf_counter() - start
        )
    info["nvme_bytes"] = dir_bytes(nvme)
    ctx.log(f"deepspeed: {info['weights']}, swap files {info['nvme_bytes'] / 1e9:.2f} GB")
    module = deepspeed.initialize(model=model, config=cfg)[0].module
    module.eval()
    ids = ctx.ids(1)
    fwd = forward_fn(module, ids)
    w = shape.weight_bytes
    with torch.no_grad():
        ctx.passes(
            "DeepSpeed ZeRO-3 offload_param nvme, 1st pass",
            fwd,
            1,
            weight_bytes=w,
            also_streams_bytes=shape.nonlayer_bytes,
        )
        ctx.passes(
            "DeepSpeed, later passes (trace recorded)",
            fwd,
            ctx.args.ds_passes - 1,
            weight_bytes=w,
            also_streams_bytes=shape.nonlayer_bytes,
        )
        _decode_rows(ctx, "DeepSpeed", module, weight_bytes=w)
    if not ctx.args.keep:
        remove(nvme)
