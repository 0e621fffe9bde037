"""Builds the C++ core `infinity._C` ahead of time (pybind11, plain C++17, no torch headers)."""

import hashlib
import os
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ROOT = Path(__file__).parent


def source_hash() -> str:
    """Hash of every file under csrc/; infinity/_core.py compares it to detect a stale build."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.is_file() and path.suffix in {".h", ".cpp"}:
            digest.update(path.relative_to(ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


extra_compile_args = ["-O2", "-Wall", "-Wextra"]
extra_link_args = []
if os.environ.get("INFINITY_SANITIZE"):
    flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    extra_compile_args += flags
    extra_link_args += flags

ext = Pybind11Extension(
    "infinity._C",
    sources=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp")),
    include_dirs=[str(ROOT / "csrc" / "include")],
    cxx_std=17,
    define_macros=[("INFINITY_SOURCE_HASH", f'"{source_hash()}"')],
    extra_compile_args=extra_compile_args,
    extra_link_args=extra_link_args,
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
