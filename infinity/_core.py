"""Loads the C++ core `infinity._C` and checks that it matches the sources it came from."""

from __future__ import annotations

import hashlib
from pathlib import Path

_REBUILD = "rebuild it with `make build` (or `pip install --no-build-isolation -e .` in the venv)"


def _source_hash(csrc: Path) -> str:
    # Mirrors setup.py's source_hash(); kept tiny and dependency-free on purpose.
    digest = hashlib.sha256()
    root = csrc.parent
    for path in sorted(csrc.rglob("*")):
        if path.is_file() and path.suffix in {".h", ".cpp"}:
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


try:
    from infinity import _C  # noqa: F401  (the compiled extension)
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        f"infinity's C++ extension infinity._C is missing or cannot load ({exc}); {_REBUILD}"
    ) from exc

_csrc = Path(__file__).resolve().parent.parent / "csrc"
if _csrc.is_dir():  # an editable checkout: catch an extension built from older sources
    _want = _source_hash(_csrc)
    if _C.SOURCE_HASH != _want:
        raise ImportError(
            f"infinity._C is stale: built from csrc/ {_C.SOURCE_HASH}, the sources are now "
            f"{_want}; {_REBUILD}"
        )

Arena = _C.Arena
ArenaStats = _C.ArenaStats
