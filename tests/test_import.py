"""`import infinity` is cheap and safe: no compilation, no CUDA, a clear error for a bad _C."""

import shutil
import subprocess
import sys
from pathlib import Path

import infinity

ROOT = Path(infinity.__file__).resolve().parent.parent


def run_python(code: str, cwd=None, env_path=None) -> subprocess.CompletedProcess:
    """Run code in a child; with env_path, only that copy of the package is importable
    (``-S``: no site-packages, so the editable install's finder cannot supply infinity._C)."""
    env, flags = None, []
    if env_path is not None:
        import os

        env, flags = dict(os.environ, PYTHONPATH=str(env_path)), ["-S"]
    return subprocess.run(
        [sys.executable, *flags, "-c", code],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def test_import_initialises_nothing():
    proc = run_python(
        "import sys, infinity, torch\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
        "assert 'deepspeed' not in sys.modules, 'DeepSpeed imported'\n"
        "assert 'torch.utils.cpp_extension' not in sys.modules, 'a JIT build was prepared'\n"
        "import infinity.io\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised by infinity.io'\n"
        "print('ok')"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def _copy_package(tmp_path: Path, with_extension: bool) -> Path:
    shutil.copytree(
        ROOT / "infinity",
        tmp_path / "infinity",
        ignore=shutil.ignore_patterns("__pycache__", *(() if with_extension else ("_C*.so",))),
    )
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    return tmp_path


def test_missing_extension_says_how_to_rebuild(tmp_path):
    root = _copy_package(tmp_path, with_extension=False)
    proc = run_python("import infinity", cwd=root, env_path=root)
    assert proc.returncode != 0
    assert "infinity._C is missing" in proc.stderr and "make build" in proc.stderr


def test_stale_extension_says_how_to_rebuild(tmp_path):
    root = _copy_package(tmp_path, with_extension=True)
    arena = root / "csrc" / "src" / "arena.cpp"
    arena.write_text(arena.read_text() + "\n// changed\n")
    proc = run_python("import infinity", cwd=root, env_path=root)
    assert proc.returncode != 0
    assert "infinity._C is stale" in proc.stderr and "make build" in proc.stderr
    # and the unchanged copy imports fine
    arena.write_text(arena.read_text().replace("\n// changed\n", ""))
    assert run_python("import infinity", cwd=root, env_path=root).returncode == 0


def test_public_surface_is_small():
    assert set(infinity.__all__) >= {
        "AioConfig",
        "InfinityError",
        "StorageIOError",
        "CapacityError",
        "IntegrityError",
        "ConfigError",
    }
    assert len(infinity.__all__) <= 12
    from infinity import StoreConfig, TieredStore

    assert TieredStore.__module__ == "infinity.store.store" and StoreConfig().pinned_bytes > 0
