"""``generate``: text from a converted store, with tokens/s and where the time went."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from infinity.inference.model import load


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
    ``model``: one from ``load`` to reuse (else loaded here with ``load_kwargs`` and closed)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(store_dir)
    own = model is None
    if own:
        model = load(store_dir, device=device, **load_kwargs)
    try:
        dev = model.device
        batch = tokenizer([prompt] * batch_size, return_tensors="pt").to(dev)
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


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
