"""``generate``: text from a converted store, with tokens/s and where the time went.

transformers' ``model.generate`` drives the streamed model (each forward streams the layers);
this module chooses its settings. Greedy unless ``temperature`` > 0; sampling then uses
``top_p`` and ``top_k`` as given, else the model's generation_config.json, else transformers'
defaults, and ``seed`` makes it repeatable. A sequence stops at any end-of-sequence id of the
model's generation_config or of the tokenizer (each row of a batch on its own; the batch ends
when every row has), or after ``max_new_tokens``. The chat template is applied to each prompt
when the tokenizer has one (``chat`` None), or as ``chat`` says.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field

import torch

from infinity.errors import ConfigError
from infinity.inference.layout import ModelLayout
from infinity.inference.model import load
from infinity.inference.resolve import resolve_store
from infinity.inference.tokenizer import find_tokenizer, load_tokenizer, prompt_texts


@dataclass
class GenerateResult:
    texts: list[str]  # per sequence, the new text (up to its end-of-sequence token)
    prompt_tokens: list[int]  # per sequence, the prompt's tokens (the chat template's included)
    tokens: list[int]  # per sequence, the new tokens (its end-of-sequence token included)
    stopped: list[str]  # per sequence: "eos" (an end-of-sequence token) or "length"
    new_tokens: int  # decoding steps: the most new tokens of any sequence
    batch_size: int
    total_s: float
    first_token_s: float  # the prompt's forward (prefill) and the first new token
    stats: dict = field(default_factory=dict)  # model.infinity.stats() after the run
    settings: dict = field(default_factory=dict)  # sampling, seed, chat, end-of-sequence ids

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second over the whole batch, prefill included."""
        return sum(self.tokens) / self.total_s if self.total_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens per second after each sequence's first (the decode rate)."""
        decode_s = self.total_s - self.first_token_s
        later = sum(self.tokens) - sum(n > 0 for n in self.tokens)
        return later / decode_s if later > 0 and decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "texts": self.texts,
            "prompt_tokens": self.prompt_tokens,
            "tokens": self.tokens,
            "stopped": self.stopped,
            "new_tokens": self.new_tokens,
            "batch_size": self.batch_size,
            "total_s": self.total_s,
            "first_token_s": self.first_token_s,
            "tokens_per_s": self.tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "settings": self.settings,
            "stats": self.stats,
        }


class _FirstToken:
    """A transformers streamer that notes when the first new token came out, and passes every
    call on to ``inner`` (a streamer of the caller's, e.g. TextStreamer) when there is one,
    without the end-of-sequence tokens ``eos`` of a single sequence (they end the text, as in
    GenerateResult.texts, even where the tokenizer does not count them as special)."""

    def __init__(self, inner=None, eos: list[int] = ()):
        self.inner, self.eos, self.calls, self.at = inner, list(eos), 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.at = time.perf_counter()
        if self.inner is None:
            return
        if self.calls > 1 and self.eos and (value.dim() <= 1 or value.shape[0] == 1):
            value = value.reshape(-1)
            value = value[~torch.isin(value, torch.tensor(self.eos, device=value.device))]
        self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


def check_arguments(prompts, max_new_tokens, batch_size, temperature, top_p, top_k, seed):
    """``prompts`` as a list; ConfigError for an empty prompt, a count or a sampling setting out
    of range, or top-p/top-k without sampling (all checked before anything is loaded)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    for p in prompts or [""]:
        if not isinstance(p, str) or not p:
            raise ConfigError(f"the prompt is {p!r}: give some text to continue (--prompt TEXT)")
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
    if temperature is not None and not (
        isinstance(temperature, int | float) and math.isfinite(temperature) and temperature >= 0
    ):
        raise ConfigError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if top_p is not None and not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise ConfigError(f"top_p must be a number in (0, 1], got {top_p!r}")
    for name, value in (("top_k", top_k), ("seed", seed)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    if seed is not None and not 0 <= seed < 2**63:
        raise ConfigError(f"seed must be from 0 to 2**63 - 1, got {seed}")
    if not temperature and (top_p is not None or top_k is not None):
        raise ConfigError(
            "top-p and top-k choose among sampled tokens, and sampling is off (temperature 0 or "
            "unset: greedy): add a temperature, e.g. --temperature 0.7"
        )
    return prompts


def generate(
    store_dir,
    prompt: str | list[str],
    max_new_tokens: int = 32,
    batch_size: int = 1,
    *,
    device="cuda",
    model=None,
    tokenizer=None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    chat: bool | None = None,
    ignore_eos: bool = False,
    streamer=None,
    **load_kwargs,
) -> GenerateResult:
    """Up to ``max_new_tokens`` new tokens for ``batch_size`` copies of each prompt (``prompt``:
    one text or a list). ``store_dir``: what ``load`` takes (a store, a Hugging Face folder or
    a Hub id, converted on first use; ``load_kwargs`` may name ``store_dir``/``dtype``). See
    the module doc for sampling, end of sequence and chat.

    ``model``: one from ``load`` to reuse (else loaded here with ``load_kwargs`` and closed).
    ``tokenizer``: a folder (see ``infinity.inference.tokenizer``) or a loaded tokenizer; None
    looks next to the store, then in the checkpoint it was converted from. ``ignore_eos``:
    exactly ``max_new_tokens`` per sequence (end-of-sequence tokens suppressed; for timing).
    ``streamer``: a transformers streamer (e.g. TextStreamer) fed the tokens as they come.
    Checked before anything is loaded: the prompts (text that makes tokens), the counts, the
    sampling settings, that ``store_dir`` holds a complete conversion and a tokenizer."""
    prompts = check_arguments(prompt, max_new_tokens, batch_size, temperature, top_p, top_k, seed)
    own = model is None
    if own:  # a checkpoint folder or Hub id: converted on first use, as load does
        given = {k: load_kwargs.pop(k) for k in ("store_dir", "dtype", "progress", "revision")
                 if k in load_kwargs}  # fmt: skip
        store_dir = resolve_store(store_dir, **given)
        ModelLayout.load(store_dir)  # "run infinity convert" before the tokenizer's complaint
    if tokenizer is None or isinstance(tokenizer, str | os.PathLike):
        tokenizer = tokenizer_for(store_dir, tokenizer)
    texts, chat_on = prompt_texts(tokenizer, prompts, chat)
    if own:
        model = load(store_dir, device=device, **load_kwargs)
    try:
        return _run(model, tokenizer, prompts, texts, chat_on, max_new_tokens, batch_size,
                    temperature, top_p, top_k, seed, ignore_eos, streamer)  # fmt: skip
    finally:
        if own:
            model.infinity.close()


def tokenizer_for(store_dir, folder=None):
    """The tokenizer in ``folder``, else in the store, else in the checkpoint it came from
    (ConfigError first when ``store_dir`` holds no complete conversion)."""
    source = ModelLayout.load(store_dir).source.get("dir")
    found = find_tokenizer(store_dir, folder, source)
    in_store = os.path.abspath(found) == os.path.abspath(store_dir)
    return load_tokenizer(found, follow=not in_store)  # convert writes no links in a store


def _eos_ids(model, tokenizer) -> list[int]:
    """The model's generation_config end-of-sequence ids, then the tokenizer's, once each."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(int(i) for i in ids))


def _run(model, tokenizer, prompts, texts, chat, max_new_tokens, batch_size, temperature, top_p,
         top_k, seed, ignore_eos, streamer) -> GenerateResult:  # fmt: skip
    from transformers import GenerationConfig

    dev = model.device
    eos = _eos_ids(model, tokenizer)
    rows = [t for t in texts for _ in range(batch_size)]
    pad = next((i for i in (tokenizer.pad_token_id, *eos) if i is not None), 0)
    if len(set(rows)) > 1 and tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = pad  # prompts of different lengths: padded on the left
    batch = tokenizer(rows, return_tensors="pt", padding=len(set(rows)) > 1,
                      padding_side="left", add_special_tokens=not chat).to(dev)  # fmt: skip
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    if min(lengths) == 0:
        empty = prompts[lengths.index(0) // batch_size]
        raise ConfigError(
            f"the prompt {empty!r} makes no tokens with the tokenizer ({tokenizer.name_or_path})"
            ": give some text to continue (--prompt TEXT)"
        )
    sample = bool(temperature)
    if sample:  # as given, else the model's generation_config, else transformers' defaults
        top_k = next(k for k in (top_k, model.generation_config.top_k, 50) if k is not None)
        top_p = next(p for p in (top_p, model.generation_config.top_p, 1.0) if p is not None)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens if ignore_eos else None,  # end-of-sequence suppressed
        do_sample=sample,
        # greedy: transformers' neutral values, so that a sampling generation_config.json
        # (temperature 0.6, top_p 0.9) fills in nothing it would warn about
        temperature=temperature if sample else 1.0,
        top_p=top_p if sample else 1.0,
        top_k=top_k if sample else 50,
        eos_token_id=eos or None,
        pad_token_id=pad,
    )
    first = _FirstToken(streamer, eos)
    fork = torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [])
    _sync(dev)
    start = time.perf_counter()
    with torch.no_grad(), fork if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(**batch, generation_config=config, streamer=first)
    _sync(dev)
    total = time.perf_counter() - start
    new = out[:, batch["input_ids"].shape[1] :].tolist()
    ends = [next((j for j, t in enumerate(row) if t in eos), None) for row in new]
    tokens = [len(row) if end is None else end + 1 for row, end in zip(new, ends, strict=True)]
    texts_out = tokenizer.batch_decode(
        [row if end is None else row[:end] for row, end in zip(new, ends, strict=True)],
        skip_special_tokens=True,
    )
    steps = len(new[0])
    first_s = (first.at - start) if first.at is not None else total / max(steps, 1)
    settings = {
        "do_sample": sample, "temperature": temperature if sample else 0.0,
        "top_p": top_p if sample else None, "top_k": top_k if sample else None,
        "seed": seed, "chat": chat, "eos_token_ids": eos, "ignore_eos": ignore_eos,
    }  # fmt: skip
    return GenerateResult(
        texts_out, lengths, tokens, ["length" if e is None else "eos" for e in ends], steps,
        len(rows), total, first_s, model.infinity.stats(), settings,
    )  # fmt: skip


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
