"""A synthetic Llama checkpoint for bench/forward.py: random bf16 weights in sharded safetensors.

Layout, like a real Hugging Face checkpoint: ``config.json`` (LlamaForCausalLM),
``model.safetensors.index.json`` and one shard per unit: the embeddings first, then one shard per
decoder layer (so the per-layer loader can read a layer's shard as its own file), then the final
norm and the head. Written layer by layer: one layer's tensors are in RAM at a time.
``synth.json`` marks a finished build; a second build with the same shape and seed is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch

FORMAT = 1
BF16 = 2  # bytes per element


@dataclass(frozen=True)
class Shape:
    layers: int = 8
    hidden: int = 8192
    intermediate: int = 28672
    heads: int = 64
    kv_heads: int = 8
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_tensors(self, i: int) -> dict[str, tuple[int, ...]]:
        h, kv, m = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        p = f"model.layers.{i}."
        return {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (m, h),
            p + "mlp.up_proj.weight": (m, h),
            p + "mlp.down_proj.weight": (h, m),
        }

    @property
    def layer_bytes(self) -> int:
        return sum(_numel(s) for s in self.layer_tensors(0).values()) * BF16

    @property
    def nonlayer_bytes(self) -> int:  # embeddings + head (untied) + final norm
        return (2 * self.vocab * self.hidden + self.hidden) * BF16

    @property
    def weight_bytes(self) -> int:  # W of the bound: the decoder layers
        return self.layers * self.layer_bytes

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "num_hidden_layers": self.layers,
            "vocab_size": self.vocab,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "use_cache": True,
            "torch_dtype": "bfloat16",
        }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def shard_names(shape: Shape) -> list[str]:
    total = shape.layers + 2
    return [f"model-{k:05d}-of-{total:05d}.safetensors" for k in range(1, total + 1)]


def layer_file(directory: str, shape: Shape, i: int) -> str:
    """The shard that holds decoder layer ``i`` and nothing else."""
    return os.path.join(directory, shard_names(shape)[i + 1])


def unit_tensors(shape: Shape) -> list[dict[str, tuple[int, ...]]]:
    """Each shard's tensors, in file order: embeddings, layers 0..N-1, norm + head."""
    h = shape.hidden
    units = [{"model.embed_tokens.weight": (shape.vocab, h)}]
    units += [shape.layer_tensors(i) for i in range(shape.layers)]
    units.append({"model.norm.weight": (h,), "lm_head.weight": (shape.vocab, h)})
    return units


class _Filler:
    """Fills bf16 tensors with N(0, 0.02) from a thread pool (torch releases the GIL)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.pool = ThreadPoolExecutor(max(1, min(32, os.cpu_count() or 1)))
        self.count = 0

    def randn(self, shape: tuple[int, ...], norm: bool) -> torch.Tensor:
        t = torch.empty(shape, dtype=torch.bfloat16)
        if norm:  # RMSNorm weights: ones, as a freshly initialised model has
            return t.fill_(1.0)
        flat = t.view(-1)
        n, step = flat.numel(), 16 << 20
        base = self.seed * 1_000_003 + self.count * 4099
        self.count += 1

        def fill(k: int) -> None:
            g = torch.Generator().manual_seed(base + k)
            flat[k * step : (k + 1) * step].normal_(0.0, 0.02, generator=g)

        list(self.pool.map(fill, range(-(-n // step))))
        return t


def _marker(shape: Shape, seed: int) -> dict:
    return {"format": FORMAT, "shape": asdict(shape), "seed": seed, "config": shape.config()}


def is_built(directory: str, shape: Shape, seed: int) -> bool:
    try:
        with open(os.path.join(directory, "synth.json")) as f:
            if json.load(f) != _marker(shape, seed):
                return False
    except (OSError, ValueError):
        return False
    return all(os.path.exists(os.path.join(directory, n)) for n in shard_names(shape))


def build(directory: str, shape: Shape, seed: int = 0, log=print) -> dict:
    """Write the checkpoint into ``directory`` unless it is there already; returns what it did."""
    from safetensors.torch import save_file

    if is_built(directory, shape, seed):
        return {"dir": directory, "built": False, "bytes": dir_bytes(directory)}
    if os.path.exists(directory):
        shutil.rmtree(directory)
    os.makedirs(directory)
    start = time.perf_counter()
    filler = _Filler(seed)
    names = shard_names(shape)
    weight_map, total = {}, 0
    try:
        for k, tensors in enumerate(unit_tensors(shape)):
            data = {n: filler.randn(s, norm=len(s) == 1) for n, s in tensors.items()}
            save_file(data, os.path.join(directory, names[k]), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in data.values())
            weight_map.update({n: names[k] for n in tensors})
            del data
            log(f"synth: wrote {names[k]} ({k + 1}/{len(names)})")
    finally:
        filler.pool.shutdown()
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(shape.config(), f, indent=1)
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, f)
    os.sync()
    with open(os.path.join(directory, "synth.json"), "w") as f:  # last: marks a complete build
        json.dump(_marker(shape, seed), f, indent=1)
    return {
        "dir": directory,
        "built": True,
        "seconds": time.perf_counter() - start,
        "bytes": total,
        "seed": seed,
    }


def dir_bytes(path: str) -> int:
    """Bytes allocated on disk under ``path`` (0 when it does not exist)."""
    if os.path.isfile(path):
        return os.stat(path).st_blocks * 512
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def disk_report(directory: str) -> dict:
    """Free and used space of the filesystem holding ``directory``, and what sits under it."""
    st = shutil.disk_usage(directory)
    subdirs = {}
    if os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            subdirs[name] = dir_bytes(os.path.join(directory, name))
    return {"free_bytes": st.free, "used_bytes": st.used, "total_bytes": st.total, "under": subdirs}
