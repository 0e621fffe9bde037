"""``make run``: a small random-weight Llama model is saved as a sharded Hugging Face checkpoint
(with a byte-level BPE tokenizer trained here, since nothing can be downloaded), converted into
a store, streamed layer by layer on the GPU if there is one (else the CPU), and its logits and
greedy generations compared with the same model held in memory.

    python -m infinity.inference.demo --dir DIR [--layers 6] [--hidden 512]

Exit status 1 when the streamed model disagrees with the in-memory one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

_TEXT = (
    "infinity streams the layers of a model from NVMe through pinned memory to the GPU, "
    "keeping what the budgets allow resident in each tier. The quick brown fox jumps over "
    "the lazy dog. 0123456789 Layers, tensors, bytes and seconds."
)


def build_checkpoint(path: str, layers: int, hidden: int, seed: int = 0):
    """A random-weight LlamaForCausalLM (fp32) and its tokenizer, saved under ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([_TEXT], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",  # decoder-only: generate continues the last token of each row
    )
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path, max_shard_size="1MB")
    tokenizer.save_pretrained(path)
    return model, tokenizer


def main(argv=None) -> int:
    from infinity.inference import convert, load
    from infinity.inference.generate import generate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="a directory on ext4/xfs (O_DIRECT)")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    hf, store_dir = os.path.join(args.dir, "hf"), os.path.join(args.dir, "store")
    reference, tokenizer = build_checkpoint(hf, args.layers, args.hidden)
    start = time.perf_counter()
    layout = convert(hf, store_dir, dtype="auto")
    took = time.perf_counter() - start
    print(f"converted {len(layout.units)} units in {took:.2f} s -> {store_dir}")

    layer = max(u.nbytes for u in layout.units if u.layer is not None)
    model = load(store_dir, device=args.device, gpu_bytes=3 * layer, pinned_bytes=3 * layer)
    reference.to(args.device).requires_grad_(False)  # as streamed weights (same kernels)
    ok = True
    try:
        plan = model.infinity.plan
        print(f"streaming on {args.device}: GPU budget 3 layers, pinned 3 layers; {plan}")
        batch = tokenizer(["The quick brown fox", "Layers, tensors"], return_tensors="pt",
                          padding=True).to(args.device)  # fmt: skip
        with torch.no_grad():
            want = reference(**batch).logits
            got = model(**batch).logits
        diff = (got - want).abs().max().item()
        exact = torch.equal(got, want)
        ok &= diff <= (0.0 if args.device == "cpu" else 1e-5)
        print(f"forward, batch 2: logits {'bitwise equal' if exact else f'max |diff| {diff:.2e}'}")
        kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        with torch.no_grad():
            same = torch.equal(model.generate(**batch, **kw), reference.generate(**batch, **kw))
        ok &= same
        verdict = "same" if same else "DIFFERENT"
        print(f"generate, batch 2, 12 tokens with KV cache: {verdict} tokens as in memory")
        result = generate(store_dir, "The quick brown fox", 16, batch_size=1, model=model)
        s = result.stats
        print(
            f"generate: {result.tokens_per_s:.1f} tokens/s, {s['steps']} layer steps, "
            f"disk {s['disk_bytes'] / 1e6:.1f} MB, stalls {s['stall_s'] * 1e3:.1f} ms; "
            f"text: {result.texts[0]!r}"
        )
    finally:
        model.infinity.close()
    print("OK: the streamed model matches the in-memory one" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
