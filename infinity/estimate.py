"""Memory arithmetic for training with ZeRO and for streamed inference (no I/O, no printing).

Every number comes with the formula that produced it (``Term.formula``), so a reader can check
it. Notation: Ψ parameters, N GPUs in total (the data-parallel degree), G GPUs per node, b micro
batch per GPU, s sequence length, h hidden size, a attention heads, L layers, V vocabulary.
GPU terms are per GPU; host and NVMe terms are per node (G GPUs' shares), as DeepSpeed's own
estimators report CPU memory.

Training (mixed-precision Adam, ZeRO paper, Rajbhandari et al. 2020, section 3): 2 bytes of
16-bit weights + 2 bytes of 16-bit gradients + 12 bytes of fp32 optimizer states (master
weights, momentum, variance) = 16 bytes per parameter. Data parallelism keeps all 16Ψ on every
GPU (7B: 112 GB, not the ~60 GB often quoted); ZeRO-1 2Ψ + 2Ψ + 12Ψ/N; ZeRO-2 2Ψ + 14Ψ/N;
ZeRO-3 16Ψ/N. Working buffers that stay on the GPU are separate terms: one gradient reduce
bucket (``reduce_bucket_size`` x 2 bytes) for ZeRO-1/2, and for ZeRO-3 the largest layer
gathered in 16 bit with its gradient (4 bytes x its numel, the term DeepSpeed's estimator uses).

Offload (ZeRO-Offload / ZeRO-Infinity): ``offload_optimizer`` moves the optimizer states and the
gradient partition to the host, where DeepSpeed keeps the gradient in fp32 for CPU Adam
(4 bytes), so the host holds 16Ψ/N per GPU; the GPU keeps the 16-bit weights. ZeRO-3's
``offload_param`` also moves the 16-bit weights (2Ψ/N per GPU). NVMe offload (ZeRO-3 only in
DeepSpeed) puts those bytes on the drive instead and keeps pinned swap buffers in host memory:
``buffer_count`` (4) x min(``sub_group_size``, Ψ/N) x 4 bytes for the optimizer and
``buffer_count`` (5) x ``buffer_size`` (1e8) x 2 bytes for the parameters (DeepSpeed's defaults).

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", section 4, no tensor or sequence parallelism), 16-bit: without checkpointing
L x s·b·h·(34 + 5·a·s/h) bytes; the 5·a·s/h part is the attention score matrices, which flash
attention does not store (``flash_attention=True`` drops it). With full checkpointing of layer
inputs: L x 2·s·b·h, plus one layer's activations recomputed during backward. Both add
4·s·b·V bytes for the fp32 logits of the loss. The sbh coefficients assume the paper's 4h MLP;
they are an estimate for SwiGLU MLPs. ZeRO partitions model states, not activations, so the
activation terms are the same for every stage (activation checkpointing is not redundant with
ZeRO-3).

Streamed inference: weights at ``dtype`` bytes per parameter; embeddings, final norm and
lm_head stay on the GPU; as many decoder layers as fit ``gpu_budget_bytes`` are resident, the
rest stream through two layer buffers (double buffering) from pinned host memory or from NVMe
(through two pinned staging buffers, plus as many host-cached layers as ``host_budget_bytes``
allows). KV cache = 2 x L x b x s x kv_heads x head_dim x 2 bytes (16-bit). Without a GPU budget
the streamed scenarios show the minimum: no resident layers.

Model shapes (``ModelSpec.from_hf_config``): Llama / Mistral / Qwen2-style decoders: embeddings
V·h; per layer q and o projections h·a·d, k and v h·kv·d (grouped-query attention, d the head
dim), MLP gate, up and down 3·h·I (x experts for Mixtral-style ``num_local_experts``, plus the
router), two RMSNorm weights; final norm h; lm_head V·h unless ``tie_word_embeddings``. Biases
on q/k/v for Qwen2 and where ``attention_bias`` is set, MLP biases where ``mlp_bias`` is set.
Another architecture with ``hidden_size``, ``num_hidden_layers`` and ``intermediate_size`` gets
the same formula, and ``ModelSpec.note`` says so. Dimensions outside ``MODEL_LIMITS`` (zero,
negative, or beyond any real model) are refused: ``check_model_config``, which convert uses too.

The answer (``answer``): for training and for inference, the scenario that fits a GPU and host
budget with the least offload (no activation checkpointing before full, then the lowest ZeRO
stage), or, when none fits, the one that needs the least GPU memory. ``parse_params`` reads
counts as people write them (125M, 7B, 1.5T, 70e9) and refuses a bare count below 10,000.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field

from infinity.errors import ConfigError
from infinity.files import load_json

BYTES_PER_PARAM = {"weights": 2, "gradients": 2, "optimizer": 12}  # mixed-precision Adam
DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
REDUCE_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default reduce_bucket_size
OPT_SWAP_BUFFERS, SUB_GROUP_ELEMENTS = 4, 1_000_000_000  # offload_optimizer defaults
PARAM_SWAP_BUFFERS, PARAM_SWAP_ELEMENTS = 5, 100_000_000  # offload_param defaults
_KNOWN_ARCH = {"llama", "mistral", "mixtral", "qwen2"}
_REQUIRED = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
MAX_PARAMS = 10**15  # 500x the largest models (~2e12)
# config key -> (smallest, largest) accepted. The largest real models stay far below: ~128
# layers, hidden_size 25600, intermediate_size 73728, vocab_size 262208, 128 heads, head_dim
# 256, 512 experts. Above these a config is a typo or hostile, and building it would take
# minutes and gigabytes (one module per layer and expert).
MODEL_LIMITS = {
    "num_hidden_layers": (1, 1024),
    "hidden_size": (1, 1 << 20),
    "intermediate_size": (1, 1 << 22),
    "vocab_size": (1, 1 << 24),
    "num_attention_heads": (1, 1 << 14),
    "num_key_value_heads": (1, 1 << 14),
    "head_dim": (1, 1 << 16),
    "num_local_experts": (0, 1024),
    "num_experts": (0, 1024),
    "n_routed_experts": (0, 1024),
}
MAX_BLOCKS = 1 << 16  # num_hidden_layers x experts (Qwen3-Next: 48 x 512 = 24576)


def check_model_config(config: dict, source: str) -> None:
    """ConfigError when a dimension in a Hugging Face config (top level or a nested section such
    as ``text_config``; a list holds one value per layer) is not a whole number within
    MODEL_LIMITS, or layers x experts exceeds MAX_BLOCKS; None means absent."""
    sections = [("", config)]
    sections += [(f"{k}.", v) for k, v in config.items() if isinstance(v, dict)]
    for prefix, section in sections:
        largest = {}
        for key, (low, high) in MODEL_LIMITS.items():
            value = section.get(key)
            for v in value if isinstance(value, list) else [value]:
                if v is None:
                    continue
                if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
                    shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."
                    raise ConfigError(
                        f"model config {source}: {prefix}{key} = {shown} is not a whole number "
                        f"from {low} to {high:,} (no real model is outside that range): fix the "
                        "file"
                    )
                largest[key] = max(largest.get(key, 1), v)
        layers = largest.get("num_hidden_layers", 1)
        experts = max([1] + [n for k, n in largest.items() if "experts" in k])
        if layers * experts > MAX_BLOCKS:
            raise ConfigError(
                f"model config {source}: {prefix}num_hidden_layers x experts = {layers} x "
                f"{experts} = {layers * experts:,} blocks, over {MAX_BLOCKS:,} (the largest real "
                "models have ~25,000): fix the file"
            )


@dataclass(frozen=True)
class ModelSpec:
    """What the arithmetic needs to know about a model; shapes are None when only Ψ is known."""

    params: int
    hidden: int | None = None
    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    vocab: int | None = None
    intermediate: int | None = None
    layer_params: int | None = None  # one decoder layer
    largest_tensor_numel: int | None = None
    source: str = "--params"
    note: str = ""

    @classmethod
    def from_params(cls, params: int | float) -> ModelSpec:
        if not (0 < params <= MAX_PARAMS) or params != int(params):  # refuses nan and inf too
            raise ConfigError(
                f"parameter count must be a whole number from 1 to {MAX_PARAMS:.0e}, got {params!r}"
            )
        return cls(params=int(params))

    @classmethod
    def from_hf_config(cls, config: dict | str | os.PathLike) -> ModelSpec:
        """Count parameters from a Hugging Face ``config.json`` (a path or the loaded dict)."""
        source = "config dict"
        if not isinstance(config, dict):
            source = os.fspath(config)
            config = load_json(source, "model config")
            if not isinstance(config, dict):
                raise ConfigError(
                    f"model config {source} holds a JSON {type(config).__name__}, not an object: "
                    "give a Hugging Face config.json"
                )
        missing = [k for k in _REQUIRED if not isinstance(config.get(k), int)]
        if missing:
            raise ConfigError(
                f"model config {source} lacks integer {missing} (model_type "
                f"{config.get('model_type')!r}); infinity counts Llama-style decoders: pass "
                "--params instead, or a config.json with hidden_size, num_hidden_layers, "
                "intermediate_size and vocab_size"
            )
        check_model_config(config, source)
        h, n_layers = config["hidden_size"], config["num_hidden_layers"]
        inter, vocab = config["intermediate_size"], config["vocab_size"]
        heads = config.get("num_attention_heads") or 1
        kv = config.get("num_key_value_heads") or heads
        hd = config.get("head_dim") or h // heads
        arch = config.get("model_type", "")
        qkv_bias = arch == "qwen2" or bool(config.get("attention_bias"))
        o_bias = bool(config.get("attention_bias"))
        experts = config.get("num_local_experts") or 1
        attn = h * heads * hd * 2 + h * kv * hd * 2
        attn += (heads * hd + 2 * kv * hd) * qkv_bias + h * o_bias
        mlp = 3 * h * inter + (2 * inter + h) * bool(config.get("mlp_bias"))
        router = h * experts if experts > 1 else 0
        layer = attn + experts * mlp + router + 2 * h
        tied = bool(config.get("tie_word_embeddings", False))
        params = vocab * h + n_layers * layer + h + (0 if tied else vocab * h)
        note = (
            ""
            if arch in _KNOWN_ARCH
            else f"model_type {arch!r} is not Llama/Mistral/Qwen2: counted with the Llama-style "
            "formula (embeddings, attention with GQA, gated MLP, norms, lm_head)"
        )
        return cls(
            params=params,
            hidden=h,
            layers=n_layers,
            heads=heads,
            kv_heads=kv,
            head_dim=hd,
            vocab=vocab,
            intermediate=inter,
            layer_params=layer,
            largest_tensor_numel=max(vocab * h, h * inter, h * heads * hd),
            source=source,
            note=note,
        )

    @property
    def has_shapes(self) -> bool:
        return self.layers is not None


@dataclass(frozen=True)
class Term:
    """One line of arithmetic: what, how it is computed, how many bytes, and where they live."""

    name: str
    formula: str
    nbytes: int
    device: str  # "gpu" (per GPU) | "host" | "nvme" (per node)


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "training" | "inference"
    stage: int | None
    offload: str  # "none" | "cpu" | "nvme"
    terms: tuple[Term, ...]

    def total(self, device: str) -> int:
        return sum(t.nbytes for t in self.terms if t.device == device)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["totals_bytes"] = {dev: self.total(dev) for dev in ("gpu", "host", "nvme")}
        return d


@dataclass(frozen=True)
class Estimate:
    model: ModelSpec
    gpus: int
    nodes: int
    scenarios: tuple[Scenario, ...]
    activations: dict[str, tuple[Term, ...]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def activation_bytes(self, mode: str) -> int:
        return sum(t.nbytes for t in self.activations.get(mode, ()))

    def to_dict(self) -> dict:
        return {
            "model": asdict(self.model),
            "gpus": self.gpus,
            "nodes": self.nodes,
            "scenarios": [s.to_dict() for s in self.scenarios],
            "activations": {k: [asdict(t) for t in v] for k, v in self.activations.items()},
            "activation_totals_bytes": {k: self.activation_bytes(k) for k in self.activations},
            "notes": list(self.notes),
        }


def _n(x: float) -> str:
    """Compact number for formulas: 7e9 -> '7.00e9', 4096 -> '4096'."""
    if x == int(x) and abs(x) < 1e6:
        return str(int(x))
    mantissa, exp = f"{x:.2e}".split("e")
    return f"{mantissa}e{int(exp)}"


def _training(m: ModelSpec, n_gpus: int, per_node: int, stage: int, opt: str, par: str) -> Scenario:
    psi, terms = m.params, []
    shard = f"{_n(psi)} / {n_gpus}"

    def add(name, per_gpu_bytes_per_param, dev, sharded):
        per_gpu = per_gpu_bytes_per_param * psi / (n_gpus if sharded else 1)
        k = per_gpu_bytes_per_param
        f = (
            f"{k} B x Ψ"
            + (" / N" if sharded else "")
            + f" = {k} x "
            + (shard if sharded else _n(psi))
        )
        if dev != "gpu":
            per_gpu, f = per_gpu * per_node, f + f" x G({per_node})"
        terms.append(Term(name, f, math.ceil(per_gpu), dev))

    # 16-bit weights
    if stage == 3 and par != "none":
        add("16-bit weights (offload_param)", 2, "host" if par == "cpu" else "nvme", True)
    else:
        add("16-bit weights", 2, "gpu", stage == 3)
    # gradients and optimizer states
    if opt == "none":
        add("16-bit gradients", 2, "gpu", stage >= 2)
        add("fp32 optimizer states (master weights, momentum, variance)", 12, "gpu", stage >= 1)
    else:
        dev = "host" if opt == "cpu" else "nvme"
        add("fp32 gradient partition (offload_optimizer)", 4, dev, True)
        add("fp32 optimizer states (offload_optimizer)", 12, dev, True)
    # working buffers
    if stage in (1, 2):
        terms.append(
            Term(
                "gradient reduce bucket (GPU working buffer)",
                f"2 B x reduce_bucket_size = 2 x {_n(REDUCE_BUCKET_ELEMENTS)}",
                2 * REDUCE_BUCKET_ELEMENTS,
                "gpu",
            )
        )
    if stage == 3 and m.largest_tensor_numel:
        big = m.largest_tensor_numel
        terms.append(
            Term(
                "largest layer gathered, 16-bit weights + gradients (GPU working buffer)",
                f"4 B x largest tensor = 4 x {_n(big)}",
                4 * big,
                "gpu",
            )
        )
    if opt == "nvme":
        numel = min(SUB_GROUP_ELEMENTS, math.ceil(psi / n_gpus))
        terms.append(
            Term(
                "optimizer swap buffers, pinned",
                f"buffer_count x min(sub_group_size, Ψ/N) x 4 B x G = {OPT_SWAP_BUFFERS} x "
                f"{_n(numel)} x 4 x {per_node}",
                OPT_SWAP_BUFFERS * numel * 4 * per_node,
                "host",
            )
        )
    if par == "nvme":
        terms.append(
            Term(
                "parameter swap buffers, pinned",
                f"buffer_count x buffer_size x 2 B x G = {PARAM_SWAP_BUFFERS} x "
                f"{_n(PARAM_SWAP_ELEMENTS)} x 2 x {per_node}",
                PARAM_SWAP_BUFFERS * PARAM_SWAP_ELEMENTS * 2 * per_node,
                "host",
            )
        )
    name = "data parallel" if stage == 0 else f"ZeRO-{stage}"
    if opt != "none":
        name += f", offload_optimizer={opt}"
    if par != "none":
        name += f", offload_param={par}"
    offload = "nvme" if "nvme" in (opt, par) else "cpu" if "cpu" in (opt, par) else "none"
    return Scenario(name, "training", stage, offload, tuple(terms))


def _activations(m: ModelSpec, b: int, s: int, flash: bool) -> dict[str, tuple[Term, ...]]:
    h, a, n_layers, v = m.hidden, m.heads, m.layers, m.vocab
    per_layer = s * b * h * 34 + (0 if flash else 5 * a * s * s * b)
    shape = "s·b·h·34" if flash else "s·b·h·(34 + 5·a·s/h)"
    nums = f"s={s} b={b} h={h}" + ("" if flash else f" a={a}")
    logits = Term(
        "fp32 logits for the loss", f"4·s·b·V = 4 x {s} x {b} x {v}", 4 * s * b * v, "gpu"
    )
    full = Term(
        "activations, no checkpointing",
        f"L x {shape}, L={n_layers} {nums}",
        n_layers * per_layer,
        "gpu",
    )
    inputs = Term(
        "checkpointed layer inputs",
        f"L x 2·s·b·h = {n_layers} x 2 x {s} x {b} x {h}",
        n_layers * 2 * s * b * h,
        "gpu",
    )
    one = Term("one layer recomputed in backward", f"{shape}, {nums}", per_layer, "gpu")
    return {"no checkpointing": (full, logits), "full checkpointing": (inputs, one, logits)}


def _inference(
    m: ModelSpec,
    offload: str,
    dtype: str,
    batch: int | None,
    seq: int | None,
    gpu_budget: int | None,
    host_budget: int | None,
) -> Scenario:
    wb = DTYPE_BYTES[dtype]
    terms: list[Term] = []
    if offload == "none" or not m.has_shapes:
        terms.append(
            Term(
                f"all weights ({dtype})",
                f"{wb:g} B x Ψ = {wb:g} x {_n(m.params)}",
                math.ceil(wb * m.params),
                "gpu",
            )
        )
    kv = 0
    if m.has_shapes and batch and seq:
        kv = 2 * m.layers * batch * seq * m.kv_heads * m.head_dim * 2
        terms.append(
            Term(
                "KV cache (16-bit)",
                f"2 x L x b x s x kv_heads x head_dim x 2 B = 2 x {m.layers} x {batch} x {seq} x "
                f"{m.kv_heads} x {m.head_dim} x 2",
                kv,
                "gpu",
            )
        )
    if offload == "none" or not m.has_shapes:
        return Scenario(
            f"inference, all weights on GPU ({dtype})", "inference", None, "none", tuple(terms)
        )
    layer_nbytes = math.ceil(wb * m.layer_params)
    other = m.params - m.layers * m.layer_params
    fixed = math.ceil(wb * other) + kv
    resident = 0
    if gpu_budget is not None:
        fit = (gpu_budget - fixed - 2 * layer_nbytes) // layer_nbytes
        resident = m.layers if gpu_budget >= fixed + m.layers * layer_nbytes else max(0, fit)
        resident = min(resident, m.layers)
    streamed = m.layers - resident
    terms.append(
        Term(
            "embeddings, final norm, lm_head",
            f"{wb:g} B x {_n(other)}",
            math.ceil(wb * other),
            "gpu",
        )
    )
    budget = "" if gpu_budget is None else f" fitting --gpu-budget {gpu_budget / 1e9:.2f} GB"
    terms.append(
        Term(
            f"resident layers{budget}",
            f"{resident} x {wb:g} B x {_n(m.layer_params)}",
            resident * layer_nbytes,
            "gpu",
        )
    )
    if streamed:
        terms.append(
            Term(
                "streaming layer buffers",
                f"2 x {wb:g} B x {_n(m.layer_params)}",
                2 * layer_nbytes,
                "gpu",
            )
        )
        if offload == "cpu":
            terms.append(
                Term(
                    "streamed layers, pinned",
                    f"{streamed} x {wb:g} B x {_n(m.layer_params)}",
                    streamed * layer_nbytes,
                    "host",
                )
            )
        else:
            cached = 0
            if host_budget is not None:
                cached = max(0, min(streamed, (host_budget - 2 * layer_nbytes) // layer_nbytes))
            terms.append(
                Term(
                    "staging buffers, pinned",
                    f"2 x {wb:g} B x {_n(m.layer_params)}",
                    2 * layer_nbytes,
                    "host",
                )
            )
            if cached:
                terms.append(
                    Term(
                        "host-cached layers (--host-budget)",
                        f"{cached} x {wb:g} B x {_n(m.layer_params)}",
                        cached * layer_nbytes,
                        "host",
                    )
                )
            terms.append(
                Term(
                    "streamed layers",
                    f"{streamed} x {wb:g} B x {_n(m.layer_params)}",
                    streamed * layer_nbytes,
                    "nvme",
                )
            )
    name = f"inference streamed from {'CPU' if offload == 'cpu' else 'NVMe'} ({dtype})"
    return Scenario(name, "inference", None, offload, tuple(terms))


_TRAINING = {
    0: (("none", "none"),),
    1: (("none", "none"), ("cpu", "none")),
    2: (("none", "none"), ("cpu", "none")),
    3: (("none", "none"), ("cpu", "none"), ("cpu", "cpu"), ("nvme", "none"), ("nvme", "nvme")),
}


def estimate(
    model: ModelSpec,
    *,
    gpus: int = 1,
    nodes: int = 1,
    stages: tuple[int, ...] = (0, 1, 2, 3),
    offload: str | None = None,
    batch: int | None = None,
    seq: int | None = None,
    flash_attention: bool = False,
    dtype: str = "bf16",
    gpu_budget_bytes: int | None = None,
    host_budget_bytes: int | None = None,
    inference: bool = True,
) -> Estimate:
    """Training scenarios for ``stages`` x offload, and streamed inference; see the module doc.

    ``offload`` keeps only the scenarios whose farthest tier is that one ("none", "cpu",
    "nvme"); None keeps all. ``gpus`` is the total over ``nodes``.
    """
    if gpus < 1 or nodes < 1 or gpus % nodes:
        raise ConfigError(
            f"--gpus {gpus} over --nodes {nodes}: both must be >= 1 and gpus a multiple of nodes"
        )
    bad = [s for s in stages if s not in _TRAINING]
    if bad:
        raise ConfigError(f"ZeRO stage {bad} does not exist; use 0 (data parallel), 1, 2 or 3")
    if offload not in (None, "none", "cpu", "nvme"):
        raise ConfigError(f"offload {offload!r}: use none, cpu or nvme")
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype {dtype!r}: use one of {sorted(DTYPE_BYTES)}")
    if (batch is None) != (seq is None) or (batch is not None and (batch < 1 or seq < 1)):
        raise ConfigError(f"give --batch and --seq together, both >= 1 (got {batch}, {seq})")
    per_node = gpus // nodes
    scenarios = [
        _training(model, gpus, per_node, stage, opt, par)
        for stage in stages
        for opt, par in _TRAINING[stage]
    ]
    notes = [model.note] if model.note else []
    activations = {}
    if batch is not None and model.has_shapes:
        activations = _activations(model, batch, seq, flash_attention)
    elif batch is not None:
        notes.append("activations need the model's shapes: pass --model config.json")
    if 3 in stages and not model.largest_tensor_numel:
        notes.append("ZeRO-3's gathered-layer buffer needs the largest tensor: pass --model")
    if inference:
        for where in ("none", "cpu", "nvme"):
            if where != "none" and not model.has_shapes:
                notes.append("streamed inference needs the layer shapes: pass --model config.json")
                break
            scenarios.append(
                _inference(model, where, dtype, batch, seq, gpu_budget_bytes, host_budget_bytes)
            )
    if offload is not None:
        scenarios = [s for s in scenarios if s.offload == offload]
    return Estimate(model, gpus, nodes, tuple(scenarios), activations, tuple(notes))


_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
BARE_COUNT_LIMIT = 10_000  # a bare count below this is a size without its suffix ("70": 70B?)


def parse_params(text: str | int | float) -> int:
    """A parameter count: 125M, 7B, 1.5T, 70e9 or 7000000000 (K, M, B or G, T: thousand,
    million, billion, trillion). ConfigError for anything else, and for a bare number below
    BARE_COUNT_LIMIT, which is a size whose suffix was left off ("70": did you mean 70B?)."""
    from decimal import Decimal, DecimalException

    raw = str(text).strip().replace("_", "").replace(",", "")
    found = re.fullmatch(r"(.*[\d.])\s*([kmbgt])", raw, re.IGNORECASE)
    digits, suffix = (found[1], found[2].lower()) if found else (raw, "")
    try:
        number = Decimal(digits) * _SUFFIXES[suffix]
    except DecimalException:
        raise ConfigError(
            f"{text!r} is not a parameter count: use a number with a suffix, such as 125M, 7B, "
            "1.5T, or a plain count such as 70e9"
        ) from None
    if not number.is_finite() or number < 1 or number != number.to_integral_value():
        raise ConfigError(f"{text!r} is not a positive whole number of parameters")
    if number > MAX_PARAMS:
        raise ConfigError(
            f"{text!r}: the parameter count must be a whole number from 1 to {MAX_PARAMS:.0e} "
            "(the largest models have about 2e12)"
        )
    if not suffix and number < BARE_COUNT_LIMIT:
        raise ConfigError(
            f"{text!r} would be {int(number)} parameters: did you mean {raw}B? (or {raw}M; "
            "counts take a suffix: 125M, 7B, 1.5T, or are written out: 70e9)"
        )
    return int(number)


@dataclass(frozen=True)
class Fit:
    """The answer for training or for inference: the scenario that fits with the least offload
    (``fits`` True), or the one that needs the least GPU memory when none fits (False) or when
    there is no GPU budget to compare with (None). Bytes as in Scenario: per GPU, per node."""

    kind: str  # "training" | "inference"
    fits: bool | None
    scenario: str
    activations: str | None  # the activation mode counted in gpu_bytes (training with --batch)
    gpu_bytes: int
    host_bytes: int
    nvme_bytes: int
    over: tuple[str, ...] = ()  # "gpu", "host": what is over budget (when it does not fit)

    def to_dict(self) -> dict:
        return asdict(self)


_OFFLOAD_RANK = {"none": 0, "cpu": 1, "nvme": 2}


def answer(est: Estimate, gpu_bytes: int | None, host_bytes: int | None) -> tuple[Fit, ...]:
    """For training and for streamed inference (those in ``est``), whether one scenario fits
    ``gpu_bytes`` per GPU and ``host_bytes`` per node (None: not checked) and which: the least
    offload, then (training) no activation checkpointing before full, then the lowest ZeRO
    stage. NVMe bytes are reported, not checked."""
    fits = []
    for kind in ("training", "inference"):
        options = []  # (preference, scenario, activation mode, gpu, host, nvme)
        for sc in (s for s in est.scenarios if s.kind == kind):
            modes = list(est.activations) if kind == "training" and est.activations else [None]
            for j, mode in enumerate(modes):
                gpu = sc.total("gpu") + (est.activation_bytes(mode) if mode else 0)
                rank = (_OFFLOAD_RANK[sc.offload], j, sc.stage or 0)
                options.append((rank, sc, mode, gpu, sc.total("host"), sc.total("nvme")))
        if not options:
            continue

        def over(option) -> tuple[str, ...]:
            _, _, _, gpu, host, _ = option
            return tuple(
                d
                for d, need, have in (("gpu", gpu, gpu_bytes), ("host", host, host_bytes))
                if have is not None and need > have
            )

        fitting = sorted((o for o in options if not over(o)), key=lambda o: o[0])
        if gpu_bytes is not None and fitting:
            best, verdict = fitting[0], True
        else:  # the least GPU memory, among those within the host budget if any are
            pool = fitting or options
            best = min(pool, key=lambda o: (o[3], o[4], o[0]))
            verdict = None if gpu_bytes is None else False
        _, sc, mode, gpu, host, nvme = best
        fits.append(Fit(kind, verdict, sc.name, mode, gpu, host, nvme, over(best)))
    return tuple(fits)
