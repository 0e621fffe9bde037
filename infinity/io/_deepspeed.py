"""Loading DeepSpeed's async I/O op (and the GDS op). The only place that imports DeepSpeed."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

from infinity.errors import AioUnavailableError

log = logging.getLogger(__name__)

_ARCH_SUFFIX = re.compile(r"^(\d+\.\d+)[a-zA-Z]+(\+PTX)?$")


def normalize_arch_list(value: str) -> str:
    """``'9.0a'`` -> ``'9.0'``: DeepSpeed 0.19.8's op builder cannot parse arch suffixes
    (``int('0a')`` raises), which common H100 images set. The aio op has no arch-specific code."""
    parts = [p for p in re.split(r"[;\s]+", value.strip()) if p]
    out = []
    for part in parts:
        match = _ARCH_SUFFIX.match(part)
        fixed = match.group(1) + (match.group(2) or "") if match else part
        if fixed not in out:
            out.append(fixed)
    return ";".join(out)


@contextlib.contextmanager
def _buildable_arch_list() -> Iterator[None]:
    original = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if original is None:
        yield
        return
    fixed = normalize_arch_list(original)
    if fixed != original:
        log.warning(
            "TORCH_CUDA_ARCH_LIST=%r cannot be parsed by DeepSpeed's op builder; building its aio "
            "op with %r (set TORCH_CUDA_ARCH_LIST=%s to silence this)",
            original,
            fixed,
            fixed,
        )
        os.environ["TORCH_CUDA_ARCH_LIST"] = fixed
    try:
        yield
    finally:
        os.environ["TORCH_CUDA_ARCH_LIST"] = original


_ENDURANCE = "Offloading to NVMe can generate heavy write traffic"


class _Quiet(logging.Filter):
    """Drops DeepSpeed's drive-endurance warning: logged from inside our first write, it reads as
    infinity's own (aio.py says it once, in its own words, at INFO)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_ENDURANCE)


@functools.cache
def quiet_deepspeed() -> None:
    """Import DeepSpeed with its log on stderr. Its logger writes to stdout, and its accelerator
    detection warns at import ("Setting accelerator to CPU"), which made `--json` output
    unparseable. Call before any other DeepSpeed import."""
    with contextlib.redirect_stdout(sys.stderr):  # its handler is made at import: on stderr
        from deepspeed.utils import logging as ds_logging
    for handler in ds_logging.logger.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (
            sys.stdout,
            sys.__stdout__,
        ):
            handler.setStream(sys.stderr)  # imported before us, by someone else
    ds_logging.logger.addFilter(_Quiet())


def aio_config_defaults() -> dict[str, Any]:
    """The ``aio`` section DeepSpeed uses when a config has none (its ``AIO_DEFAULT_DICT``:
    queue depth 8, one thread in 0.19.8). Not the aio handle's constructor defaults (queue depth
    128), which no DeepSpeed config reaches."""
    quiet_deepspeed()
    from deepspeed.runtime.swap_tensor.aio_config import AIO_DEFAULT_DICT

    return dict(AIO_DEFAULT_DICT)


_LIBAIO_HINT = (
    "install libaio's development files (Debian/Ubuntu: `apt-get install libaio-dev`; "
    "RHEL/Fedora: `dnf install libaio-devel`), or point CFLAGS/LDFLAGS (and CPATH/LIBRARY_PATH) "
    "at a libaio you unpacked"
)


@functools.cache
def load_aio() -> Any:
    """DeepSpeed's compiled ``async_io`` module (JIT-built on first use, then cached on disk)."""
    try:
        quiet_deepspeed()
        from deepspeed.ops.op_builder import AsyncIOBuilder
    except ImportError as exc:
        raise AioUnavailableError(
            f"DeepSpeed is not importable ({exc}); install it with "
            "`pip install deepspeed==0.19.8 --no-build-isolation` after torch"
        ) from exc
    builder = AsyncIOBuilder()
    with _buildable_arch_list():
        if not builder.is_compatible(verbose=False):
            raise AioUnavailableError(
                f"DeepSpeed's async_io op cannot be built: libaio was not found. {_LIBAIO_HINT}"
            )
        try:
            return builder.load(verbose=False)
        except Exception as exc:  # a compiler error, a missing ninja, ...
            raise AioUnavailableError(
                f"DeepSpeed's async_io op failed to build or load: {exc}. {_LIBAIO_HINT}; "
                "a build cache in TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) "
                "left by another torch version can be deleted"
            ) from exc


@functools.cache
def load_gds() -> Any | None:
    """DeepSpeed's GPUDirect Storage op, or None (with the reason logged) when it cannot load."""
    try:
        quiet_deepspeed()
        from deepspeed.ops.op_builder import GDSBuilder

        builder = GDSBuilder()
        with _buildable_arch_list():
            if not builder.is_compatible(verbose=False):
                log.info("GDS op is not compatible here (needs CUDA and libcufile)")
                return None
            return builder.load(verbose=False)
    except Exception as exc:
        log.info("GDS op unavailable: %s", exc)
        return None


def deepspeed_version() -> str | None:
    try:
        quiet_deepspeed()
        import deepspeed

        return str(deepspeed.__version__)
    except Exception:
        return None
