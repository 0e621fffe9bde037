"""Loading DeepSpeed's async I/O op (and the GDS op). The only place that imports DeepSpeed.

DeepSpeed compiles its ops on first use (``torch.utils.cpp_extension``: minutes on a few cores)
into torch's extension cache, ``TORCH_EXTENSIONS_DIR`` or else ~/.cache/torch_extensions/
pyXY_BUILD (``extensions_root``), then loads them from there in a second. A load that will
compile says so first (one WARNING: what, why, where) and shows that it is going on
(``set_build_progress``; a log line every 30 s by default).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
class OpBuild:
    """What loading a DeepSpeed op will do: compile it first (``needed``, with the ``reason``) or
    load the build cached in ``build_dir``."""

    name: str
    build_dir: str
    needed: bool
    reason: str = ""

    def notice(self) -> str:
        """The one line that says what compiles, why, for how long and where it is kept."""
        return (
            f"compiling DeepSpeed's {self.name} op, {_PURPOSE.get(self.name, 'used by infinity')}"
            f": {self.reason}. This takes minutes (4 to 9 on 2 cores), once: later runs load "
            "the build from there (TORCH_EXTENSIONS_DIR moves it)"
        )


_PURPOSE = {
    "async_io": "which infinity's disk reads and writes run on",
    "gds": "GPUDirect Storage (infinity info checks whether it loads)",
}


def extensions_root() -> str:
    """Where torch keeps the ops it compiles: ``TORCH_EXTENSIONS_DIR`` as given, else its per-user
    cache with a folder per Python and CUDA/ROCm/CPU build (``~/.cache/torch_extensions/
    py311_cu128``). torch's own ``_get_build_directory`` is private and creates the folder;
    tests/test_aio_build.py checks that the two agree."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is not None:
        return root
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        build = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        build = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        build = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return os.path.join(get_default_build_root(), f"{python}_{build}")


def build_state(builder: Any) -> OpBuild:
    """Whether ``builder.load()`` compiles (minutes) or loads a cached build (a second). A
    prediction from the files torch's JIT build leaves (ninja decides in the end): no compile
    for an op DeepSpeed was installed with (DS_BUILD_AIO=1) or one with no sources (DeepSpeed's
    stand-in for an op the accelerator lacks), none when ``NAME.so`` is in the build folder, its
    build.ninja names this DeepSpeed's sources and none of them is newer."""
    from deepspeed.git_version_info import installed_ops

    name = builder.name
    build_dir = os.path.join(extensions_root(), name)
    sources = [os.path.abspath(builder.deepspeed_src_path(p)) for p in builder.sources()]
    if installed_ops.get(name, False) or not sources:  # not sources: an op this accelerator lacks
        return OpBuild(name, build_dir, False)
    library = os.path.join(build_dir, f"{name}.so")
    if not os.path.exists(library):
        return OpBuild(name, build_dir, True, f"no build of it in {build_dir} yet")
    try:
        with open(os.path.join(build_dir, "build.ninja")) as f:
            recipe = f.read()
    except OSError:
        recipe = ""
    if not all(src in recipe for src in sources):
        why = f"the build in {build_dir} is another DeepSpeed install's"
        return OpBuild(name, build_dir, True, why)
    built = os.path.getmtime(library)
    if any(os.path.getmtime(src) > built for src in sources if os.path.exists(src)):
        why = f"DeepSpeed's sources are newer than the build in {build_dir}"
        return OpBuild(name, build_dir, True, why)
    return OpBuild(name, build_dir, False)


BuildProgress = Callable[[OpBuild], contextlib.AbstractContextManager[Any]]
HEARTBEAT_S = 30.0  # a compile with no terminal to draw on: a log line this often


@contextlib.contextmanager
def _log_progress(build: OpBuild) -> Iterator[None]:
    """A line every HEARTBEAT_S seconds while the compile runs (logs have no spinner)."""
    done, start = threading.Event(), time.monotonic()

    def beat() -> None:
        while not done.wait(HEARTBEAT_S):
            elapsed = int(time.monotonic() - start)
            minutes, seconds = divmod(elapsed, 60)
            log.warning("still compiling DeepSpeed's %s op: %d:%02d", build.name, minutes, seconds)

    thread = threading.Thread(target=beat, name=f"compiling-{build.name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


_progress: BuildProgress = _log_progress


def set_build_progress(show: BuildProgress | None) -> None:
    """How a compile shows that it is going on: ``show(build)`` is entered for the compile's
    duration (the CLI draws a spinner with the elapsed time on a terminal). None: the library's
    own, a log line every HEARTBEAT_S seconds. The WARNING that says what compiles, and why,
    comes first either way."""
    global _progress
    _progress = show or _log_progress


def _load_op(builder: Any) -> Any:
    """``builder.load()``, said when it compiles: one WARNING (what, why, where it is kept),
    then the progress shown for the compile's duration."""
    build = build_state(builder)
    if not build.needed:
        return builder.load(verbose=False)
    log.warning(build.notice())
    start = time.monotonic()
    with _progress(build):
        op = builder.load(verbose=False)
    log.info("compiled DeepSpeed's %s op in %.0f s", build.name, time.monotonic() - start)
    return op


@contextlib.contextmanager
def _stderr_with_a_descriptor() -> Iterator[None]:
    """DeepSpeed's libaio probe (``is_compatible``) silences the compiler by redirecting
    ``sys.stderr.fileno()``; a replaced sys.stderr without one (pytest's capsys, some notebooks)
    made it report libaio missing. Such a stderr is swapped for the process's own meanwhile."""
    try:
        sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        with contextlib.redirect_stderr(sys.__stderr__):
            yield
        return
    yield


@functools.cache
def load_aio() -> Any:
    """DeepSpeed's compiled ``async_io`` module. On first use it is compiled (minutes; said on
    stderr, with progress) into torch's extension cache (``extensions_root()``), then loaded
    from there."""
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
        with _stderr_with_a_descriptor():
            compatible = builder.is_compatible(verbose=False)
        if not compatible:
            raise AioUnavailableError(
                f"DeepSpeed's async_io op cannot be built: libaio was not found. {_LIBAIO_HINT}"
            )
        try:
            return _load_op(builder)
        except Exception as exc:  # a compiler error, a missing ninja, ...
            raise AioUnavailableError(
                f"DeepSpeed's async_io op failed to build or load: {exc}. {_LIBAIO_HINT}; "
                f"a build cache in {extensions_root()} (TORCH_EXTENSIONS_DIR) left by another "
                "torch version can be deleted"
            ) from exc


@functools.cache
def load_gds() -> Any | None:
    """DeepSpeed's GPUDirect Storage op, or None (with the reason logged) when it cannot load."""
    try:
        quiet_deepspeed()
        from deepspeed.ops.op_builder import GDSBuilder

        builder = GDSBuilder()
        with _buildable_arch_list():
            with _stderr_with_a_descriptor():
                compatible = builder.is_compatible(verbose=False)
            if not compatible:
                log.info("GDS op is not compatible here (needs CUDA and libcufile)")
                return None
            return _load_op(builder)
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
