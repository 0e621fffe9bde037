"""Checkpoint tensor names -> the model's parameter names, the way ``from_pretrained`` maps them.

transformers 5 loads a checkpoint through a list of weight transforms chosen per model class and
``model_type`` (``transformers.conversion_mapping.get_model_conversion_mapping``, the entry point
PEFT uses too): a ``WeightRenaming`` renames a key (GPT-NeoX's ``embed_out`` -> ``lm_head``,
Mixtral's ``block_sparse_moe`` -> ``mlp``, the legacy ``LayerNorm.gamma``), a ``WeightConverter``
makes a parameter out of several tensors (Mixtral's per-expert ``w1``/``w3`` stacked into one
``experts.gate_up_proj``), and the base model prefix (``model.``, ``transformer.``) is added or
dropped where that names a parameter. transformers 5 also *saves* some models under the old names
(it reverts the transforms on save), so a checkpoint fresh from ``save_pretrained`` may need them.

This module owns that dependency. ``match`` runs the steps of transformers'
``core_model_loading.convert_and_load_state_dict_in_model`` on the names alone: checkpoint names in
its natural order, every renaming then at most one converter (``rename_source_key``), the plain
prefix fallback, the first tensor kept when two name one parameter. A converter's tensors form a
``Conversion``; it runs once on meta tensors while planning (its outputs' shapes are checked
before a byte is read) and once on the real tensors when ``convert`` writes them: its sources
and its output are in memory together then (Mixtral-8x7B's gate_up_proj of one layer: 1.9 GB of
each), as in from_pretrained.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from infinity.errors import ConfigError
from infinity.inference.checkpoint import TensorSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Conversion:
    """Model tensors that one transformers ``WeightConverter`` makes from checkpoint tensors:
    ``sources`` holds them per source pattern, in the order ``from_pretrained`` collects them;
    ``layer_name`` is the first target's name (transformers' name for the group)."""

    layer_name: str
    converter: Any = field(repr=False)  # a WeightConverter holding no tensors
    sources: tuple[tuple[str, tuple[TensorSource, ...]], ...]
    model: Any = field(repr=False, compare=False)  # the meta model: some ops read its config

    @property
    def names(self) -> list[str]:
        return [src.name for _, tensors in self.sources for src in tensors]

    def describe(self) -> str:
        names = self.names
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        ops = ", ".join(type(op).__name__ for op in self.converter.operations)
        return f"{', '.join(names[:3])}{more} ({ops})"

    def run(self, read: Callable[[TensorSource], torch.Tensor]) -> dict[str, torch.Tensor]:
        """The converter's outputs by model name, each source read with ``read``."""
        conv = copy.deepcopy(self.converter)  # it collects the tensors of one call
        for pattern, tensors in self.sources:
            for src in tensors:  # a callable: transformers' synchronous loading path
                conv.add_tensor(self.layer_name, src.name, pattern, partial(read, src))
        with torch.no_grad():
            out = conv.convert(self.layer_name, model=self.model, config=self.model.config)
        return {name: t[0] if isinstance(t, list) else t for name, t in out.items()}


@dataclass
class KeyMap:
    """Where each model tensor's value comes from: a checkpoint tensor read as it is, or a
    Conversion; its dtype and shape as loaded; the checkpoint names no model tensor takes."""

    sources: dict[str, TensorSource | Conversion]
    shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    unused: list[str]

    def origin(self, name: str) -> str:
        """The checkpoint tensor(s) behind model tensor ``name``, in words."""
        src = self.sources[name]
        if isinstance(src, Conversion):
            return f"{name} (made by transformers from {src.describe()})"
        return src.name if src.name == name else f"{src.name} (loaded as {name})"


def match(model: torch.nn.Module, header: dict[str, TensorSource]) -> KeyMap:
    """Map the checkpoint tensors in ``header`` onto ``model`` (built by build_meta_model) as
    ``from_pretrained`` does; converters are planned on meta tensors (nothing is read).
    ConfigError when transformers' mapping is ambiguous or a converter cannot run on these
    shapes."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    wanted = model.state_dict(keep_vars=True)  # parameters and persistent buffers, by name
    prefix = model.base_model_prefix
    direct: dict[str, TensorSource] = {}
    groups: dict[str, tuple[Any, dict[str, list[TensorSource]]]] = {}
    unused: list[str] = []
    for name in sorted(header, key=dot_natural_key):
        target, pattern = rename_source_key(name, renamings, converters, prefix, wanted)
        if target not in wanted and name in wanted:  # as transformers: the name as it is
            target, pattern = rename_source_key(name, [], [], prefix, wanted)
        if target not in wanted:
            unused.append(name)
        elif pattern is None and target not in groups:
            if target in direct:
                log.warning(
                    "checkpoint tensors %s and %s both load as %s: the first is kept (as "
                    "from_pretrained does)", direct[target].name, name, target,
                )  # fmt: skip
                unused.append(name)
            else:
                direct[target] = header[name]
        elif pattern is not None and target not in direct:
            converter, collected = groups.setdefault(target, (by_pattern[pattern], {}))
            if converter is not by_pattern[pattern]:
                raise _ambiguous(target, name)
            collected.setdefault(pattern, []).append(header[name])
        else:
            raise _ambiguous(target, name)

    sources: dict[str, TensorSource | Conversion] = dict(direct)
    shapes = {target: (src.dtype, src.shape) for target, src in direct.items()}
    for target, (converter, collected) in groups.items():
        conversion = Conversion(
            target, converter, tuple((p, tuple(t)) for p, t in collected.items()), model
        )
        for name, tensor in _plan(conversion).items():
            if name not in wanted:
                log.info("%s makes %s, which %s lacks: skipped", conversion.describe(), name,
                         type(model).__name__)  # fmt: skip
                continue
            if name in sources:
                raise _ambiguous(name, conversion.describe())
            sources[name] = conversion
            shapes[name] = (tensor.dtype, tuple(tensor.shape))
    return KeyMap(sources, shapes, unused)


def _plan(conversion: Conversion) -> dict[str, torch.Tensor]:
    """The converter run on meta tensors of the checkpoint's dtypes and shapes."""
    try:
        return conversion.run(lambda src: torch.empty(src.shape, dtype=src.dtype, device="meta"))
    except Exception as exc:  # transformers' ops raise ValueError, RuntimeError, IndexError...
        raise ConfigError(
            f"transformers' conversion of {conversion.describe()} into {conversion.layer_name} "
            f"fails on these tensors' shapes ({type(exc).__name__}: {exc}): the checkpoint does "
            "not match its config.json, or from_pretrained cannot load it either"
        ) from None


def _ambiguous(target: str, name: str) -> ConfigError:
    return ConfigError(
        f"{target} is made twice from the checkpoint (again from {name}) under transformers' "
        "renaming for this model: the checkpoint mixes old and new names for it; save it again "
        "with save_pretrained"
    )
