"""The tokenizer of a converted model: where it is found, how it is loaded, and prompts into
token ids (with the chat template when there is one).

Where (``find_tokenizer``): the folder given (``--tokenizer DIR``: a folder with the tokenizer
files, or a Hugging Face cache folder ``models--ORG--NAME``, read at the snapshot ``refs/main``
names), else the store (``convert`` copies the tokenizer files next to model.json), else the
checkpoint the store was converted from. A folder counts when it holds one of VOCABULARIES.
Every tokenizer file is opened first as a regular file (a FIFO would hang transformers' open);
in the store a link is refused too (convert writes no links), in a folder the user names links
are followed (a Hub cache snapshot is links into blobs/).
"""

from __future__ import annotations

import os

from infinity.errors import ConfigError
from infinity.files import open_config, read_regular
from infinity.inference.checkpoint import COPIED

VOCABULARIES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # a tokenizer needs one
_NOT_TOKENIZER = ("config.json", "generation_config.json")


def _has_vocabulary(folder: str) -> bool:
    return any(os.path.lexists(os.path.join(folder, n)) for n in VOCABULARIES)


def hub_snapshot(folder: str) -> str:
    """``folder`` itself, or for a Hugging Face cache folder (``models--ORG--NAME`` with
    ``refs/main`` and ``snapshots/``) the snapshot that ``refs/main`` names."""
    ref = os.path.join(folder, "refs", "main")
    if _has_vocabulary(folder) or not os.path.lexists(ref):
        return folder
    revision = read_regular(ref, "Hub cache reference", max_bytes=4096, follow=True)
    snapshot = os.path.join(folder, "snapshots", revision.decode(errors="replace").strip())
    if not os.path.isdir(snapshot):
        raise ConfigError(
            f"{ref} names the snapshot {os.path.basename(snapshot)!r}, which is not in "
            f"{os.path.join(folder, 'snapshots')}: give the snapshot folder itself (--tokenizer)"
        )
    return snapshot


def find_tokenizer(store_dir, tokenizer_dir=None, source_dir: str | None = None) -> str:
    """The folder to load the tokenizer from (see the module doc); ConfigError saying where it
    looked and what to do when there is none."""
    names = ", ".join(VOCABULARIES)
    if tokenizer_dir is not None:
        folder = os.fspath(tokenizer_dir)
        if not os.path.exists(folder):
            raise ConfigError(f"--tokenizer {folder} does not exist: give the tokenizer's folder")
        if not os.path.isdir(folder):
            raise ConfigError(
                f"--tokenizer {folder} is not a directory: give the folder that holds "
                "tokenizer.json (or tokenizer.model) and tokenizer_config.json"
            )
        folder = hub_snapshot(os.path.abspath(folder))
        if not _has_vocabulary(folder):
            raise ConfigError(
                f"--tokenizer {folder} has no tokenizer: none of {names} is there; give the "
                "folder that holds the model's tokenizer.json and tokenizer_config.json"
            )
        return folder
    store_dir = os.path.abspath(store_dir)
    if _has_vocabulary(store_dir):
        return store_dir
    if source_dir and os.path.isdir(source_dir) and _has_vocabulary(source_dir):
        return os.path.abspath(source_dir)
    also = f", nor in {source_dir}, the checkpoint it was converted from" if source_dir else ""
    raise ConfigError(
        f"{store_dir} has no tokenizer: none of {names} is there{also}. Give the folder "
        "that holds the model's tokenizer.json and tokenizer_config.json (from its Hub "
        f"repository) with --tokenizer DIR, or copy those files into {store_dir}"
    )


def load_tokenizer(folder: str, *, follow: bool = True):
    """transformers' AutoTokenizer for ``folder``, its files checked first (``follow``: whether a
    link may stand for a file); ConfigError naming the files when transformers cannot load them."""
    from transformers import AutoTokenizer

    present = [n for n in COPIED if os.path.lexists(os.path.join(folder, n))]
    for name in present:
        os.close(open_config(os.path.join(folder, name), name, follow=follow))
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # transformers raises many kinds for files it cannot use
        found = ", ".join(n for n in present if n not in _NOT_TOKENIZER)
        raise ConfigError(
            f"transformers cannot load the tokenizer in {folder} ({found}): "
            f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        ) from None


def prompt_texts(tokenizer, prompts: list[str], chat: bool | None) -> tuple[list[str], bool]:
    """Each prompt as the model reads it, and whether the chat template was applied: ``chat``
    None applies it when the tokenizer has one; True without one is a ConfigError."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise ConfigError(
            f"the tokenizer ({tokenizer.name_or_path}) has no chat template: drop --chat, or give "
            "a tokenizer that has one (chat_template in tokenizer_config.json, or "
            "chat_template.jinja) with --tokenizer"
        )
    if not (has_template if chat is None else chat):
        return list(prompts), False
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    return texts, True
