"""What ``load`` is given, taken the way ``from_pretrained`` takes it: a converted store, a Hugging
Face checkpoint folder, or a Hub model id; a checkpoint is converted into a store on first use.

``resolve_store(source, store_dir, dtype, progress, revision)`` -> the store directory:
- a folder holding model.json is a store, returned as it is (``store_dir`` must not name another);
- a folder holding config.json is a checkpoint: returned is ``store_dir`` once it holds the
  complete conversion of this checkpoint (same files: names, sizes, mtimes) in ``dtype``;
  otherwise ``convert`` writes it there first (resumed where an earlier, interrupted first use
  stopped; ``progress`` as for convert; every check and refusal of convert holds);
- anything else is a Hub model id (``org/name``): ``huggingface_hub.snapshot_download`` gives its
  snapshot folder, from the local Hugging Face cache when offline (``HF_HUB_OFFLINE=1``; where the
  cache is: ``HF_HUB_CACHE`` / ``HF_HOME``), downloading the safetensors, config and tokenizer
  files otherwise; then as a folder. The snapshot is read in place (its links into blobs/ too).

Where the store goes when ``store_dir`` is not given: ``INFINITY_CACHE`` (environment), else
``$XDG_CACHE_HOME/infinity``, else ``~/.cache/infinity``; in it ``NAME-DTYPE-HASH``, NAME the
checkpoint folder's name (a Hub id's ``org--name``), HASH of the checkpoint's real path (a Hub
snapshot is one revision: each revision gets its own store). Not next to the checkpoint: a Hub
cache or a read-only folder is no place for it. The store needs a disk filesystem that takes
O_DIRECT (not tmpfs or overlayfs): convert refuses others, and the error then says to set
``store_dir=`` or ``INFINITY_CACHE`` (on an NVMe drive, ideally).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re

from infinity.errors import ConfigError, InfinityError
from infinity.inference.checkpoint import COPIED, INDEX, checkpoint_files
from infinity.inference.layout import DTYPE_CHOICES, LAYOUT_FILE, ModelLayout

log = logging.getLogger(__name__)

CACHE_ENV = "INFINITY_CACHE"
HUB_FILES = [*COPIED, "*.safetensors", INDEX]  # what a first use downloads from the Hub


def resolve_store(
    source: str | os.PathLike,
    store_dir: str | os.PathLike | None = None,
    dtype: str = "auto",
    progress=None,
    revision: str | None = None,
) -> str:
    """The store directory for ``source`` (see the module docstring)."""
    if dtype not in DTYPE_CHOICES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}; got {dtype!r}")
    path = os.path.abspath(os.path.expanduser(os.fspath(source)))
    if os.path.isdir(path) and os.path.lexists(os.path.join(path, LAYOUT_FILE)):
        if store_dir is not None and os.path.abspath(store_dir) != path:
            raise ConfigError(
                f"{path} is a converted store already (it holds {LAYOUT_FILE}); store_dir= "
                f"({store_dir}) is where a checkpoint is converted to: leave it out"
            )
        if dtype != "auto" and ModelLayout.load(path).dtype != dtype:
            raise ConfigError(
                f"{path} is a store converted with dtype {ModelLayout.load(path).dtype!r}; "
                f"dtype={dtype!r} applies when converting a checkpoint: leave it out, or load the "
                "checkpoint itself"
            )
        return path
    if os.path.isdir(path) and not os.path.lexists(os.path.join(path, "config.json")):
        raise ConfigError(
            f"{path} has no {LAYOUT_FILE}: it is not a converted model (or its conversion never "
            f"started); run `infinity convert HF_DIR {path}` first. Nor has it a config.json: "
            "it is no Hugging Face checkpoint folder either (load converts one on first use)"
        )
    if os.path.isdir(path):
        return _converted(path, os.path.basename(path), store_dir, dtype, progress)
    if os.path.lexists(path):
        raise ConfigError(
            f"{path} is not a directory: give a converted store, a Hugging Face checkpoint folder "
            "(config.json and *.safetensors) or a Hub model id"
        )
    snapshot = _hub_snapshot(os.fspath(source), revision, path)
    return _converted(snapshot, os.fspath(source).replace("/", "--"), store_dir, dtype, progress)


def default_store_dir(hf_dir: str, name: str, dtype: str) -> str:
    """Where a checkpoint is converted to when ``load`` is not told (module docstring)."""
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "infinity",
    )
    digest = hashlib.sha256(os.path.realpath(hf_dir).encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:80] or "model"
    return os.path.join(os.path.abspath(os.path.expanduser(base)), f"{safe}-{dtype}-{digest}")


def _converted(hf_dir: str, name: str, store_dir, dtype: str, progress) -> str:
    from infinity.inference.convert import convert

    given = store_dir is not None
    store_dir = os.path.abspath(store_dir) if given else default_store_dir(hf_dir, name, dtype)
    if _holds(store_dir, hf_dir, dtype):
        return store_dir
    log.info("converting %s into %s (first use; later loads read the store)", hf_dir, store_dir)
    try:
        convert(hf_dir, store_dir, dtype, progress=progress)
    except InfinityError as exc:
        where = "store_dir=" if given else f"the default store_dir (under ${CACHE_ENV})"
        exc.add_note(
            f"infinity.inference.load converts {hf_dir} into {store_dir}, {where}: give another "
            f"store_dir= (or set {CACHE_ENV}) on a drive with room and O_DIRECT, or fix the "
            "checkpoint as said above"
        )
        raise
    return store_dir


def _holds(store_dir: str, hf_dir: str, dtype: str) -> bool:
    """``store_dir`` holds the complete conversion of ``hf_dir``'s files as they are now."""
    if not os.path.lexists(os.path.join(store_dir, LAYOUT_FILE)):
        return False
    try:
        layout = ModelLayout.load(store_dir)
    except ConfigError:
        return False  # incomplete or damaged: convert resumes it or says what is wrong
    _, source = checkpoint_files(hf_dir)
    return layout.dtype == dtype and layout.source.get("files") == source["files"]


def _hub_snapshot(repo_id: str, revision: str | None, path: str) -> str:
    """The local snapshot folder of Hub model ``repo_id`` (downloaded unless offline)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError:
        raise ConfigError(
            f"{path} does not exist: give a converted store, a Hugging Face checkpoint folder "
            "(config.json and *.safetensors) or a Hub model id (org/name)"
        ) from None
    offline = constants.is_offline_mode()
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES)
    except (OSError, ValueError) as exc:
        mode = "HF_HUB_OFFLINE is set: the cache only" if offline else "online"
        raise ConfigError(
            f"{repo_id!r} is no folder here, and the Hub model {repo_id} (revision "
            f"{revision or 'main'}) could not be found in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE} ({mode}: {type(exc).__name__}: {exc}); download it "
            f"(`hf download {repo_id}`), or give its folder"
        ) from None
