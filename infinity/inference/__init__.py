"""Streamed inference: ``convert`` a Hugging Face checkpoint into a store, ``load`` it to run
layer by layer (``from infinity.inference import convert, load``); ``load`` also takes the
checkpoint folder or its Hub id and converts it on first use."""

import importlib

# `convert` is bound at import (it loads torch, not transformers): the function shares its
# submodule's name, and a lazy binding would be replaced by the submodule whenever
# `infinity.inference.convert` was imported first. `load` is resolved on first use.
from infinity.inference.convert import convert

_LAZY = {"load": "infinity.inference.model"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'infinity.inference' has no attribute {name!r}")


__all__ = ["convert", "load"]
