"""Check a DeepSpeed config for mistakes that cost memory or speed; each finding says why, and the
fix.

``lint(config, model=None) -> list[Finding]``. Levels: ``error`` (DeepSpeed refuses the config,
crashes later, or silently does something else than written) and ``warning`` (it runs, slower or
with more memory than needed).

Unknown keys: the schema is read from DeepSpeed's own pydantic models where it has them
(``DeepSpeedZeroConfig`` with its nested offload models, fp16/bf16, monitors, comms logger,
compile), their field names and aliases (``stage3_*``) both count; DeepSpeed's
``AIO_DEFAULT_DICT`` gives the ``aio`` keys; the top-level keys are the table ``TOP_LEVEL_KEYS``
below (DeepSpeed reads them one by one in ``runtime/config.py``, so there is no model to ask).
Sections whose contents are free-form (``optimizer.params``, ``scheduler.params``, ...) are not
descended into. An unknown key is an error: inside ``zero_optimization`` DeepSpeed refuses it;
elsewhere it is silently ignored, which for a typo such as ``zero_optimisation`` means the
setting is not applied. The closest known key (difflib) is suggested.

Thresholds and choices:
- ``reduce_bucket_size`` / ``allgather_bucket_size`` / ``stage3_prefetch_bucket_size`` above
  ``BUCKET_WARN_ELEMENTS`` = 1e9 elements: each bucket is a 16-bit buffer of that many elements,
  2 GB or more per bucket (and ZeRO-1/2 with ``overlap_comm`` keeps several); DeepSpeed's
  default is 5e8 (reduce/allgather) and 5e7 (prefetch).
- ZeRO-3 under ``SMALL_MODEL_PARAMS`` = 1e9 parameters (needs ``model``): 16Ψ bytes of model
  states is under 16 GB, which data parallelism or ZeRO-1/2 fit on one modern GPU, while ZeRO-3
  all-gathers every parameter in forward and backward (1.5x the traffic of data parallelism).
- ``pin_memory``: a warning when it is false, or absent while the installed DeepSpeed defaults it
  to false (0.19 defaults it to true; older versions to false). Pageable host memory roughly
  halves host<->GPU bandwidth and prevents overlap with compute.
- ``overlap_comm: false`` written explicitly with ZeRO-1/2/3 is a warning; left out it is not
  (DeepSpeed turns it on for ZeRO-3 by default; for ZeRO-1/2 it costs 4.5x allgather_bucket_size
  of extra memory, which is a trade-off, not a mistake).
- NVMe offload without an ``aio`` section: warning (DeepSpeed's defaults, block_size 1 MiB,
  queue_depth 8, intra_op_parallelism 1, are far from what NVMe drives need; run
  ``infinity bench io``). ``aio.thread_count``: warning (DeepSpeed ignores it).
- ``offload_param.buffer_size`` smaller than the largest tensor (needs ``model``) with NVMe
  parameter offload: error, DeepSpeed's parameter swapper cannot hold that tensor.
- ``nvme_path`` missing, not a directory, or on tmpfs/ramfs (memory, not a disk): error.
- Numbers outside the bounds DeepSpeed's pydantic models declare (``reduce_bucket_size`` > 0,
  other bucket and buffer sizes >= 0, ...; ``*_size``/``*_count`` >= 0 where none is declared),
  ``aio`` block_size / queue_depth / intra_op_parallelism below 1, and a ``stage`` DeepSpeed
  does not read as 0-3: error.
- The file: a regular file (a FIFO or /dev/zero would block) of at most 64 MiB, not empty,
  whose numbers are finite and fit 64 bits; anything else is a ConfigError naming the file.
- Activation checkpointing together with ZeRO-3 is never flagged: ZeRO-3 partitions model
  states, not activations.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import typing
from dataclasses import asdict, dataclass

from infinity.errors import ConfigError
from infinity.estimate import ModelSpec
from infinity.files import decode_text, read_regular
from infinity.io.fsinfo import MEMORY_FS, mount_of

BUCKET_WARN_ELEMENTS = 1_000_000_000
SMALL_MODEL_PARAMS = 1_000_000_000

TOP_LEVEL_KEYS = frozenset(
    """
    train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps
    managed_gradient_accumulation steps_per_print dump_state disable_python_gc disable_allgather
    communication_data_type seq_parallel_communication_data_type prescale_gradients
    gradient_predivide_factor gradient_allreduce_op sparse_gradients zero_optimization
    zero_allow_untested_optimizer zero_force_ds_cpu_optimizer activation_checkpointing
    comms_logger tensorboard wandb csv_monitor comet gradient_clipping fp16 bf16 bfloat16 amp
    torch_autocast optimizer scheduler flops_profiler wall_clock_breakdown memory_breakdown
    autotuning use_data_before_expert_parallelism hybrid_engine pipeline data_efficiency
    curriculum_learning checkpoint data_types aio dataloader_drop_last log_level nebula
    datastates weight_quantization compile timers tensor_parallel expert_parallel elasticity
    sparse_attention compression_training progressive_layer_drop eigenvalue quantize_training
    zenflow gradient_accumulation_dtype
    """.split()
)
_FREE_FORM = {"optimizer", "scheduler", "activation_checkpointing", "flops_profiler", "pipeline"}


@dataclass(frozen=True)
class Finding:
    level: str  # "error" | "warning"
    path: str  # e.g. "zero_optimization.offload_param.pin_memory"
    message: str  # what, and why it matters
    fix: str

    def to_dict(self) -> dict:
        return asdict(self)


def load_config(path: str | os.PathLike) -> dict:
    """Read a DeepSpeed config file, JSON or HJSON (as DeepSpeed itself does): a regular file of
    at most 64 MiB holding a non-empty object of finite numbers; ConfigError naming the file
    otherwise."""
    import hjson

    text = decode_text(read_regular(path, "DeepSpeed config"), path, "DeepSpeed config")
    if not text.strip():
        raise ConfigError(
            f"DeepSpeed config {path} is empty: write the config in it (a JSON object)"
        )
    try:
        data = json.loads(json.dumps(hjson.loads(text)))  # OrderedDicts -> dicts
    except hjson.HjsonDecodeError as exc:
        raise ConfigError(f"{path} is neither JSON nor HJSON: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply to be a DeepSpeed config") from None
    except (ValueError, OverflowError) as exc:  # 1e999 (hjson), ints over 4300 digits
        raise ConfigError(f"{path} holds a number Python cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a DeepSpeed config is an object, got {type(data).__name__}")
    _check_numbers(data, path)
    return data


def _check_numbers(data: dict, path) -> None:
    """ConfigError for a number DeepSpeed cannot use: inf, nan, or an int beyond 64 bits."""
    stack: list[tuple[str, object]] = [("", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            stack += [(f"{where}.{k}" if where else str(k), v) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(f"{where}[{i}]", v) for i, v in enumerate(value)]
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}: {where} is {value}, not a finite number: fix the value")
        elif isinstance(value, int) and abs(value) >= 2**63:
            raise ConfigError(
                f"{path}: {where} is an integer of {len(str(abs(value)))} digits, beyond 64 bits "
                "(DeepSpeed's limit): fix the value"
            )


def _model_keys(cls) -> dict[str, object]:
    """Known keys of a pydantic model: name or alias -> nested model class (or None)."""
    from pydantic import BaseModel

    keys: dict[str, object] = {}
    for name, info in cls.model_fields.items():
        nested = None
        for ann in (info.annotation, *typing.get_args(info.annotation)):
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                nested = ann
        keys[name] = nested
        if info.alias:
            keys[info.alias] = nested
    return keys


def _section_models() -> dict[str, object]:
    from deepspeed.comm.config import CommsLoggerConfig
    from deepspeed.compile.config import CompileConfig
    from deepspeed.monitor.config import CometConfig, CSVConfig, TensorBoardConfig, WandbConfig
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return {
        "zero_optimization": DeepSpeedZeroConfig,
        "fp16": DeepSpeedFP16Config,
        "bf16": DeepSpeedBF16Config,
        "bfloat16": DeepSpeedBF16Config,
        "comms_logger": CommsLoggerConfig,
        "compile": CompileConfig,
        "tensorboard": TensorBoardConfig,
        "wandb": WandbConfig,
        "csv_monitor": CSVConfig,
        "comet": CometConfig,
    }


def _unknown(path: str, key: str, known) -> Finding:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    fix = f"did you mean '{close[0]}'?" if close else f"remove it; known keys: {sorted(known)}"
    return Finding("error", path, f"unknown key '{key}': DeepSpeed rejects or ignores it", fix)


def _check_keys(config: dict) -> list[Finding]:
    from deepspeed.runtime.swap_tensor.aio_config import AIO_DEFAULT_DICT

    out: list[Finding] = []
    models = _section_models()

    def walk(section: dict, prefix: str, cls) -> None:
        known = _model_keys(cls)
        for key, value in section.items():
            if key not in known:
                out.append(_unknown(f"{prefix}.{key}", key, known))
            elif known[key] is not None and isinstance(value, dict):
                walk(value, f"{prefix}.{key}", known[key])
            else:
                info = _field(cls, key)
                out.extend(_check_bound(f"{prefix}.{key}", value, info))
                extra = getattr(info, "json_schema_extra", None) or {}
                if extra.get("deprecated"):
                    new = extra.get("new_param", "")
                    out.append(
                        Finding(
                            "warning",
                            f"{prefix}.{key}",
                            f"'{key}' is deprecated in DeepSpeed",
                            f"use '{new}' instead" if new else "remove it",
                        )
                    )

    for key, value in config.items():
        if key not in TOP_LEVEL_KEYS:
            out.append(_unknown(key, key, TOP_LEVEL_KEYS))
        elif key in models and isinstance(value, dict):
            walk(value, key, models[key])
        elif key == "aio" and isinstance(value, dict):
            for sub in value:
                if sub == "thread_count":
                    default_threads = AIO_DEFAULT_DICT["intra_op_parallelism"]
                    out.append(
                        Finding(
                            "warning",
                            "aio.thread_count",
                            "DeepSpeed ignores 'thread_count'; the aio handle runs with "
                            f"intra_op_parallelism (default {default_threads})",
                            "rename it to 'intra_op_parallelism'",
                        )
                    )
                elif sub not in AIO_DEFAULT_DICT:
                    out.append(_unknown(f"aio.{sub}", sub, AIO_DEFAULT_DICT))
                elif sub in ("block_size", "queue_depth", "intra_op_parallelism"):
                    n = _number(value[sub])
                    if n is not None and n < 1:
                        out.append(
                            Finding(
                                "error",
                                f"aio.{sub}",
                                f"{sub} = {n:g}: the aio handle needs at least 1",
                                f"set {sub} to a positive number (DeepSpeed's default is "
                                f"{AIO_DEFAULT_DICT[sub]}; `infinity bench io` finds the best)",
                            )
                        )
    return out


def _field(cls, key: str):
    """The pydantic FieldInfo of ``key`` (a field name or its alias) in ``cls``, or None."""
    for name, info in cls.model_fields.items():
        if key in (name, info.alias):
            return info
    return None


def _check_bound(path: str, value, info) -> list[Finding]:
    """An error when a number breaks a bound DeepSpeed's model declares (reduce_bucket_size > 0,
    buffer sizes >= 0, ...); settings named *_size or *_count are >= 0 where it declares none."""
    n = _number(value)
    if n is None or info is None:
        return []
    bounds = [
        (op, getattr(m, attr))
        for m in info.metadata
        for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
        if getattr(m, attr, None) is not None
    ]
    if not bounds and path.endswith(("_size", "_count")):
        bounds = [(">=", 0)]
    compare = {">": float.__gt__, ">=": float.__ge__, "<": float.__lt__, "<=": float.__le__}
    broken = [f"{op} {bound}" for op, bound in bounds if not compare[op](n, float(bound))]
    if not broken:
        return []
    key = path.rpartition(".")[2]
    return [
        Finding(
            "error",
            path,
            f"{key} = {n:g}: DeepSpeed refuses it (it must be {' and '.join(broken)})",
            f"set {key} {' and '.join(broken)}, or remove it to get DeepSpeed's default",
        )
    ]


def _stage(value) -> int | None:
    """The ZeRO stage as DeepSpeed reads it (3, "3", 3.0; "auto" is 0), None for no stage."""
    if value == "auto":
        return 0
    try:
        stage = float(value)
    except (TypeError, ValueError):
        return None
    return int(stage) if stage in (0, 1, 2, 3) else None


def _number(value) -> float | None:
    """A numeric setting, or None for "auto" (HF Trainer) and other non-numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _installed_pin_default() -> bool:
    from deepspeed.runtime.zero.offload_config import DeepSpeedZeroOffloadParamConfig

    return bool(DeepSpeedZeroOffloadParamConfig.model_fields["pin_memory"].default)


def _check_zero(config: dict, model: ModelSpec | None) -> list[Finding]:
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict):
        return []
    out: list[Finding] = []
    stage = _stage(zero.get("stage", 0))
    if stage is None:
        return [
            Finding(
                "error",
                "zero_optimization.stage",
                f"stage {zero['stage']!r} is not a ZeRO stage: DeepSpeed refuses the config",
                'use "stage": 0 (data parallel), 1, 2 or 3',
            )
        ]
    if zero.get("overlap_comm") is False and stage >= 1:
        out.append(
            Finding(
                "warning",
                "zero_optimization.overlap_comm",
                "overlap_comm is false: gradient reduction and parameter gathering wait for "
                "compute instead of running beside it",
                'set "overlap_comm": true (ZeRO-1/2: costs about 4.5x allgather_bucket_size '
                "of extra GPU memory)",
            )
        )
    for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"):
        n = _number(zero.get(key))
        if n is not None and n > BUCKET_WARN_ELEMENTS:
            out.append(
                Finding(
                    "warning",
                    f"zero_optimization.{key}",
                    f"{key} = {n:.3g} elements is a {2 * n / 1e9:.1f} GB 16-bit buffer per "
                    "bucket; it spikes GPU memory during communication",
                    f"use at most {BUCKET_WARN_ELEMENTS:.0e} (DeepSpeed's default is 5e8, 5e7 for "
                    "the prefetch bucket)",
                )
            )
    if stage == 3 and model is not None and model.params < SMALL_MODEL_PARAMS:
        out.append(
            Finding(
                "warning",
                "zero_optimization.stage",
                f"ZeRO-3 on a {model.params / 1e9:.2f}B-parameter model: its model states "
                f"({16 * model.params / 1e9:.1f} GB at 16 bytes per parameter) fit one GPU, and "
                "ZeRO-3 all-gathers every parameter in forward and backward (1.5x the traffic of "
                "data parallelism), so communication outweighs the memory saved",
                'use data parallelism or ZeRO-1/2 ("stage": 1 or 2)',
            )
        )
    nvme = False
    for part in ("offload_param", "offload_optimizer"):
        sec = zero.get(part)
        if not isinstance(sec, dict) or sec.get("device", "none") in ("none", None):
            continue
        device, path = sec["device"], f"zero_optimization.{part}"
        if part == "offload_param" and stage != 3:
            out.append(
                Finding(
                    "warning",
                    path,
                    f"offload_param works only with ZeRO-3; with stage {stage} it is ignored",
                    'set "stage": 3 or remove offload_param',
                )
            )
        if device == "nvme" and stage != 3:
            out.append(
                Finding(
                    "error",
                    f"{path}.device",
                    f"NVMe offload needs ZeRO-3 (ZeRO-Infinity); stage is {stage}",
                    'set "stage": 3, or use "device": "cpu"',
                )
            )
        pin = sec.get("pin_memory", _installed_pin_default())
        if pin is False:
            said = "is false" if "pin_memory" in sec else "is left out (false by default here)"
            out.append(
                Finding(
                    "warning",
                    f"{path}.pin_memory",
                    f"{part} to {device} with pin_memory {said}: copies from pageable host "
                    "memory run at about half the bandwidth and cannot overlap compute",
                    'set "pin_memory": true (check `ulimit -l`, `infinity info`)',
                )
            )
        if device == "nvme":
            nvme = True
            out.extend(_check_nvme_path(sec.get("nvme_path"), f"{path}.nvme_path"))
        if part == "offload_param" and device == "nvme" and model is not None:
            size = _number(sec.get("buffer_size", 100_000_000))
            big = model.largest_tensor_numel
            if size is not None and big and size < big:
                out.append(
                    Finding(
                        "error",
                        f"{path}.buffer_size",
                        f"buffer_size {size:.3g} elements is smaller than the model's largest "
                        f"tensor ({big} elements): the parameter swapper cannot hold it",
                        f'set "buffer_size" to at least {big}',
                    )
                )
    if nvme and "aio" not in config:
        out.append(
            Finding(
                "warning",
                "aio",
                "NVMe offload without an 'aio' section runs DeepSpeed's defaults (block_size "
                "1 MiB, queue_depth 8, intra_op_parallelism 1), far below what NVMe drives reach",
                'add an "aio" section; `infinity bench io --dir NVME_PATH` prints one measured '
                "on your drive",
            )
        )
    return out


def _check_nvme_path(nvme_path, path: str) -> list[Finding]:
    if not nvme_path:
        return [
            Finding(
                "error",
                path,
                "NVMe offload without nvme_path",
                'set "nvme_path" to a directory on a local NVMe drive',
            )
        ]
    if not os.path.isdir(nvme_path):
        return [
            Finding(
                "error",
                path,
                f"nvme_path {nvme_path} does not exist or is not a directory (on this machine)",
                "create it on a local NVMe drive, or fix the path",
            )
        ]
    point, fstype, _ = mount_of(nvme_path)
    if fstype in MEMORY_FS:
        return [
            Finding(
                "error",
                path,
                f"nvme_path {nvme_path} is on {fstype} (mounted at {point}): that is RAM, not a "
                "disk, so offloading there costs host memory twice",
                "point nvme_path at a directory on a local NVMe drive (ext4 or xfs)",
            )
        ]
    return []


def lint(config: dict | str | os.PathLike, model: ModelSpec | str | os.PathLike | None = None):
    """Findings for a DeepSpeed config (a dict or a JSON/HJSON path); ``model`` is a ModelSpec
    or a Hugging Face config.json path, needed for the size-dependent checks."""
    if not isinstance(config, dict):
        config = load_config(config)
    else:
        _check_numbers(config, "config dict")
    if model is not None and not isinstance(model, ModelSpec):
        model = ModelSpec.from_hf_config(model)
    from infinity.io import quiet_deepspeed

    quiet_deepspeed()  # its config models come next; its log must not reach stdout
    findings = _check_keys(config) + _check_zero(config, model)
    return sorted(findings, key=lambda f: (f.level != "error", f.path))


def exit_code(findings: list[Finding]) -> int:
    """0 clean, 1 warnings only, 2 any error."""
    if any(f.level == "error" for f in findings):
        return 2
    return 1 if findings else 0
