"""infinity in bench/forward.py: convert the synthetic checkpoint into our store, then time
forward passes streamed from it (``infinity.inference.load``) over a sweep of pinned budgets,
and an fp8 store. Any failure is recorded in the result and the bench goes on."""

from __future__ import annotations

import gc
import os
import time
import traceback
from functools import partial

import torch
from _measure import GIB, parse_size, remove
from _peers import _decode_rows, forward_fn
from _synth import dir_bytes

SLACK = 8 << 20  # per layer: alignment of its keys' pinned buffers, fp8 scales


def _stats(model) -> dict:
    s = model.infinity.stats()
    if not isinstance(s, dict):
        s = s._asdict() if hasattr(s, "_asdict") else dict(vars(s))
    return {k: v for k, v in s.items() if isinstance(v, int | float | str | bool | None)}


def _convert(ctx, convert, dtype: str) -> str:
    store = os.path.join(ctx.work, f"infinity-store-{dtype}")
    remove(store)
    start = time.perf_counter()
    convert(ctx.ckpt, store, dtype=dtype, nvme_paths=None)
    info = {"s": time.perf_counter() - start, "store_bytes": dir_bytes(store)}
    ctx.result.setdefault("info", {})[f"convert_{dtype}"] = info
    gb = info["store_bytes"] / 1e9
    ctx.log(f"infinity: converted to {dtype} in {info['s']:.1f} s, {gb:.2f} GB")
    ctx.disk(f"after convert {dtype}")
    ctx.save()
    return store


def _configs(ctx) -> list[tuple[str, float | None, int]]:
    """(label, fraction of the layers kept pinned or None for pure streaming, pinned bytes)."""
    L, W = ctx.shape.layer_bytes, ctx.shape.weight_bytes
    L += SLACK  # each key's pinned buffer starts 4 KiB-aligned
    out = [("all streaming (pinned = 2 layers)", None, 2 * L, {})]
    # single weight matrices: two buffers of the largest unit (the 1.05 GB embedding, which then
    # streams too, as do the head and the norms) instead of the small modules plus two layers
    matrix = {"granularity": "matrix", "gpu_bytes": 2 * ctx.shape.vocab * ctx.shape.hidden * 2}
    matrix["gpu_bytes"] += 64 << 20
    out.append(("all streaming, matrix granularity", None, 2 * L, matrix))
    out += [
        (f"pinned {f:g} of the layers + 2 layers", f, int(f * W) + 2 * L, {})
        for f in ctx.args.pinned_fractions
    ]
    return out


def _run_config(ctx, load, store, label, frac, pinned, extra, weight_bytes, decode, dtype):
    gpu = extra.get("gpu_bytes", ctx.gpu_bytes)
    granularity = extra.get("granularity", "layer")
    ctx.drop()
    start = time.perf_counter()
    model = load(
        store, device=str(ctx.device), gpu_bytes=gpu, pinned_bytes=pinned, granularity=granularity
    )
    load_s = time.perf_counter() - start
    fwd = None
    try:
        model.eval()
        ids = ctx.ids(1)
        fwd = forward_fn(model, ids)
        plan = model.infinity.stats()
        fields = {
            "weight_bytes": weight_bytes,
            "pinned_bytes": pinned,
            "gpu_bytes": gpu,
            # what the plan keeps across passes (the rest streams), from the model itself
            "c_ram_bytes": min(weight_bytes, plan["resident_pinned_bytes"]),
            "c_gpu_bytes": min(weight_bytes, plan["resident_gpu_bytes"]),
            "plan": plan["plan"],
            "load_s": load_s,
            "pinned_fraction": frac or 0.0,
            "dtype": dtype,
            "granularity": granularity,
        }
        with torch.no_grad():
            ctx.passes(
                f"infinity {dtype}, {label}",
                fwd,
                ctx.args.passes,
                steady=True,
                stats=partial(_stats, model),
                **fields,
            )
            if decode:
                _decode_rows(ctx, f"infinity {dtype}, {label}", model, **fields)
    finally:
        model.infinity.close()
        del model, fwd
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


def run_infinity(ctx) -> None:
    try:
        from infinity.inference import convert, load
    except Exception as exc:  # noqa: BLE001 - recorded; the peers still run
        ctx.result.update(status="error", error=f"import infinity.inference: {exc!r}")
        ctx.result["errors"].append({"where": "import", "error": repr(exc)})
        return
    shape, a, cap = ctx.shape, ctx.args, ctx.mem_cap
    configs = _configs(ctx)
    allowed = configs
    if cap is not None:  # the pinned tier is charged to the cgroup: leave room for the rest
        room = cap - min(parse_size(a.cap_headroom), cap // 3)
        allowed = [c for c in configs if c[2] <= room]
        for label, _, pinned, _ in configs[len(allowed) :]:
            ctx.note(
                f"infinity: '{label}' skipped: pinned {pinned / GIB:.2f} GiB > "
                f"{room / GIB:.2f} GiB (memory cap {cap / GIB:.2f} GiB less headroom)"
            )
    for dtype in a.infinity_dtypes:
        if dtype == "bf16":
            todo, w = allowed, shape.weight_bytes
        else:  # one cold streaming config: half the bytes of bf16 (scales not counted)
            todo, w = (
                [(configs[0][0], None, shape.layer_bytes + 2 * SLACK, {})],
                shape.weight_bytes // 2,
            )
        if not todo:
            continue
        try:
            store = _convert(ctx, convert, dtype)
        except Exception as exc:  # noqa: BLE001
            ctx.error(f"convert {dtype}", exc, traceback.format_exc())
            continue
        for k, (label, frac, pinned, extra) in enumerate(todo):
            decode = dtype == "bf16" and k == len(todo) - 1  # the most pinned config
            try:
                _run_config(ctx, load, store, label, frac, pinned, extra, w, decode, dtype)
            except Exception as exc:  # noqa: BLE001
                ctx.error(f"infinity {dtype}, {label}", exc, traceback.format_exc())
        if not a.keep:
            remove(store)
            ctx.disk(f"after removing the {dtype} store")
