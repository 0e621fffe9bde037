"""infinity in bench/forward.py: convert the synthetic checkpoint into our store, then time
forward passes streamed from it (``infinity.inference.load``) over a sweep of pinned budgets,
and an fp8 store. Any failure is recorded in the result and the bench goes on."""

from __future__ import annotations

import gc
import os
import statistics
import time
import traceback
from functools import partial

import torch
from _measure import (
    GIB,
    drop_page_cache,
    io_summary,
    parse_size,
    read_files,
    remove,
    timed_pass,
)
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
    for gib in ctx.args.matrix_gpu:  # more GPU memory: the plan keeps some matrices there
        more = {"granularity": "matrix", "gpu_bytes": int(gib * GIB)}
        out.append((f"matrix granularity, GPU {gib:g} GiB", None, 2 * L, more))
    if ctx.args.unverified:  # what verifying every byte read costs (xxh3, hashing threads)
        out.append(("all streaming, checksums not verified", None, 2 * L, {"verify_checksums": 0}))
    out += [
        (f"pinned {f:g} of the layers + 2 layers", f, int(f * W) + 2 * L, {})
        for f in ctx.args.pinned_fractions
    ]
    return out


def _run_config(ctx, load, store, label, frac, pinned, extra, weight_bytes, decode, dtype, fresh):
    gpu = extra.get("gpu_bytes", ctx.gpu_bytes)
    granularity = extra.get("granularity", "layer")
    verify = bool(extra.get("verify_checksums", True))
    ctx.drop()
    start = time.perf_counter()
    model = load(
        store,
        device=str(ctx.device),
        gpu_bytes=gpu,
        pinned_bytes=pinned,
        granularity=granularity,
        verify_checksums=verify,
    )
    load_s = time.perf_counter() - start
    fwd = None
    try:
        model.eval()
        fwd, marks = _marked(model, ctx.ids(1), ctx.device)
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
            "verify_checksums": verify,
        }
        with torch.no_grad():
            row = ctx.passes(
                f"infinity {dtype}, {label}",
                fwd,
                ctx.args.passes,
                steady=True,
                stats=partial(_stats, model),
                **fields,
            )
            _add_io(model, row["passes"], marks)
            if fresh and ctx.args.pairs:  # the process's first pass, against the disk just after
                probe = read_files(_store_files(store), ctx.cold_paths)
                row["fresh_pair"] = _pair(
                    ctx, "fresh", probe, row["passes"][0], weight_bytes, False
                )
            ctx.save()
            if dtype not in ctx.logits:  # the first config of each dtype: for fp8 vs bf16
                ctx.logits[dtype] = marks["logits"].float().cpu()
            if decode:
                _decode_rows(ctx, f"infinity {dtype}, {label}", model, **fields)
    finally:
        model.infinity.close()
        del model, fwd
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


def _marked(model, ids, device):
    """A forward pass that notes when it began and ended (for the executor's timeline) and
    keeps its logits (on the device: copied out after the timing, if needed)."""
    marks = {"spans": []}

    def fwd():
        start = time.perf_counter()
        out = forward_fn(model, ids)()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks["spans"].append((start, time.perf_counter()))
        marks["logits"] = out.logits

    return fwd, marks


def _add_io(model, passes: list[dict], marks: dict) -> None:
    """Each pass's disk activity (``_measure.io_summary``) into its record."""
    timeline = list(model.infinity.timeline)
    sizes = [u.nbytes for u in model.infinity.units]
    for p, (t0, t1) in zip(passes, marks["spans"], strict=False):
        p["io"] = io_summary(timeline, sizes, t0, t1)


def _store_files(store: str) -> list[str]:
    """The store's data files (``.bin``; the manifest and lock left out)."""
    from infinity.inference.layout import ModelLayout

    paths = ModelLayout.load(store).store_paths
    files = [os.path.join(p, n) for p in paths for n in sorted(os.listdir(p)) if n.endswith(".bin")]
    if not files:
        raise RuntimeError(f"no .bin data files under {paths}")
    return files


def _pair(ctx, what: str, probe: dict, p: dict, w: int, probe_first: bool) -> dict:
    """A raw read against the pass ``p`` beside it (the pass itself is not copied in)."""
    bound = w / (probe["gbps"] * 1e9)
    ctx.log(
        f"{what}: raw read {probe['gbps']:.2f} GB/s -> bound {bound:.3f} s; "
        f"first pass {p['s']:.3f} s; ratio {bound / p['s']:.3f}"
    )
    order = "probe, pass" if probe_first else "pass, probe"
    return {
        "order": order,
        "probe": probe,
        "bound_s": bound,
        "bound_over_pass": bound / p["s"],
    }


def _paired(ctx, load, store: str, pinned: int) -> None:
    """Cold first passes after a fresh ``load``, each next to a raw-engine read of the same
    store files, in the order probe-pass, pass-probe, ... (the disk drifts during a run, and a
    read may warm whatever caches sit behind a virtual disk for the next one): the ratio of
    each pair is the bound on these bytes, measured beside the pass, over the pass."""
    files, w = _store_files(store), ctx.shape.weight_bytes
    pairs = []
    for k in range(ctx.args.pairs):
        probe = read_files(files, ctx.cold_paths) if k % 2 == 0 else None
        drop_page_cache(ctx.cold_paths)
        model = load(store, device=str(ctx.device), gpu_bytes=ctx.gpu_bytes, pinned_bytes=pinned)
        try:
            fwd, marks = _marked(model, ctx.ids(1), ctx.device)
            with torch.no_grad():
                p = timed_pass(fwd, ctx.device, ctx.cold_paths)
            _add_io(model, [p], marks)
            p["stats"] = _stats(model)
        finally:
            model.infinity.close()
            del model
            gc.collect()
        if probe is None:
            probe = read_files(files, ctx.cold_paths)
        pairs.append({**_pair(ctx, f"pair {k}", probe, p, w, k % 2 == 0), "pass": p})
    ratios = sorted(x["bound_over_pass"] for x in pairs)
    ctx.add_row({
        "name": "infinity bf16, 1st pass after load, paired with a raw read of the same files",
        "kind": "paired", "pairs": pairs, "s": statistics.median(x["pass"]["s"] for x in pairs),
        "bound_over_pass_median": statistics.median(ratios), "bound_over_pass_min": ratios[0],
        "weight_bytes": w, "pinned_bytes": pinned, "dtype": "bf16", "granularity": "layer",
    })  # fmt: skip


def _compare_logits(ctx) -> None:
    """fp8 against bf16 on the same prompt: relative L2 error and top-1 agreement of the logits."""
    a, b = ctx.logits.get("bf16"), ctx.logits.get("fp8")
    if a is None or b is None:
        return
    diff = (b - a).flatten()
    ctx.result.setdefault("info", {})["fp8_vs_bf16_logits"] = out = {
        "relative_l2": float(diff.norm() / a.flatten().norm()),
        "max_abs": float(diff.abs().max()),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        "positions": int(a.shape[0] * a.shape[1]),
        "note": "random weights (the synthetic checkpoint); a real checkpoint is not measured",
    }
    ctx.log(f"fp8 vs bf16 logits: {out}")
    ctx.save()


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
    ctx.logits = {}
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
                fresh = dtype == a.infinity_dtypes[0] and k == 0  # this process's first pass
                _run_config(ctx, load, store, label, frac, pinned, extra, w, decode, dtype, fresh)
            except Exception as exc:  # noqa: BLE001
                ctx.error(f"infinity {dtype}, {label}", exc, traceback.format_exc())
        if dtype == "bf16" and a.pairs:
            try:
                _paired(ctx, load, store, configs[0][2])
            except Exception as exc:  # noqa: BLE001
                ctx.error("infinity bf16, paired first passes", exc, traceback.format_exc())
        if not a.keep:
            remove(store)
            ctx.disk(f"after removing the {dtype} store")
    _compare_logits(ctx)
