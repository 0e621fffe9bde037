"""``generate``: text from a converted store, with tokens/s and where the time went."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from infinity.errors import ConfigError
from infinity.files import open_config
from infinity.inference.checkpoint import COPIED
from infinity.inference.layout import ModelLayout
from infinity.inference.model import load

VOCABULARIES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # a tokenizer needs one


@dataclass
class GenerateResult:
    texts: list[str]
    prompt_tokens: int  # per sequence
    new_tokens: int  # per sequence
    batch_size: int
    total_s: float
    first_token_s: float  # the prompt's forward (prefill) and the first new token
    stats: dict = field(default_factory=dict)  # model.infinity.stats() after the run

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second over the whole batch, prefill included."""
        return self.batch_size * self.new_tokens / self.total_s if self.total_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens per second after the first one (the decode rate)."""
        decode_s = self.total_s - self.first_token_s
        steps = self.new_tokens - 1
        return self.batch_size * steps / decode_s if steps > 0 and decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "texts": self.texts,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "batch_size": self.batch_size,
            "total_s": self.total_s,
            "first_token_s": self.first_token_s,
            "tokens_per_s": self.tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "stats": self.stats,
        }


class _FirstToken:
    """A transformers streamer that notes when the first new token came out."""

    def __init__(self):
        self.calls, self.at = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def generate(
    store_dir,
    prompt: str,
    max_new_tokens: int = 32,
    batch_size: int = 1,
    *,
    device="cuda",
    model=None,
    **load_kwargs,
) -> GenerateResult:
    """Greedy generation of ``max_new_tokens`` for ``batch_size`` copies of ``prompt``.
    ``model``: one from ``load`` to reuse (else loaded here with ``load_kwargs`` and closed).
    Checked before anything is loaded: the prompt (text that makes tokens), the counts, that
    ``store_dir`` holds a complete conversion and a tokenizer."""
    if not isinstance(prompt, str) or not prompt:
        raise ConfigError(f"the prompt is {prompt!r}: give some text to continue (--prompt TEXT)")
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
    own = model is None
    if own:
        ModelLayout.load(store_dir)  # "run infinity convert" before the tokenizer's complaint
    tokenizer = load_tokenizer(store_dir)
    if own:
        model = load(store_dir, device=device, **load_kwargs)
    try:
        dev = model.device
        batch = tokenizer([prompt] * batch_size, return_tensors="pt").to(dev)
        if batch["input_ids"].shape[1] == 0:
            raise ConfigError(
                f"the prompt {prompt!r} makes no tokens with the tokenizer in {store_dir}: give "
                "some text to continue (--prompt TEXT)"
            )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        first = _FirstToken()
        _sync(dev)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,  # a fixed amount of work to time
                do_sample=False,
                pad_token_id=pad,
                streamer=first,
            )
        _sync(dev)
        total = time.perf_counter() - start
        prompt_len = batch["input_ids"].shape[1]
        texts = tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
        first_s = (first.at - start) if first.at is not None else total / max(max_new_tokens, 1)
        return GenerateResult(
            texts, prompt_len, out.shape[1] - prompt_len, batch_size, total, first_s,
            model.infinity.stats(),
        )  # fmt: skip
    finally:
        if own:
            model.infinity.close()


def load_tokenizer(store_dir):
    """The tokenizer convert copied into ``store_dir``; ConfigError naming the files when there
    is none, one is not a regular file (a link or a FIFO there was not written by convert), or
    transformers cannot load them."""
    from transformers import AutoTokenizer

    store_dir = os.path.abspath(store_dir)
    present = [n for n in COPIED if os.path.lexists(os.path.join(store_dir, n))]
    if not any(n in present for n in VOCABULARIES):
        raise ConfigError(
            f"{store_dir} has no tokenizer: none of {', '.join(VOCABULARIES)} is there (the "
            "checkpoint had none to copy). Put the model's tokenizer files (tokenizer.json and "
            "tokenizer_config.json, from its Hub repository) into the checkpoint and run "
            f"`infinity convert` again, or copy them into {store_dir}"
        )
    for name in present:  # a FIFO would hang transformers' open(); a link leads elsewhere
        os.close(open_config(os.path.join(store_dir, name), name, follow=False))
    try:
        return AutoTokenizer.from_pretrained(store_dir)
    except Exception as exc:  # transformers raises many kinds for files it cannot use
        found = ", ".join(n for n in present if n not in ("config.json", "generation_config.json"))
        raise ConfigError(
            f"transformers cannot load the tokenizer in {store_dir} ({found}): "
            f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        ) from None


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
