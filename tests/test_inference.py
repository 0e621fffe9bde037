"""Streamed models against the same model held in memory (CPU: bitwise in fp32)."""

import copy
import json
import os
import tempfile

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from infinity import CapacityError, ConfigError, InfinityError
from infinity.inference import convert, load

SHAPES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILIES = {
    "llama": lambda: LlamaConfig(**SHAPES),
    "mistral": lambda: MistralConfig(**SHAPES, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**SHAPES, tie_word_embeddings=True),
}


def _disk_dir(factory) -> str:
    base = os.environ.get("INFINITY_TEST_DIR")
    return tempfile.mkdtemp(prefix="infinity-inf-", dir=base) if base else str(factory.mktemp("s"))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def converted(request, tmp_path_factory):
    """(in-memory fp32 model, store dir) for one family, converted from a sharded checkpoint."""
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(FAMILIES[request.param]()).eval()
    # streamed parameters do not require grad; torch's matmul picks another (equally exact but
    # not bitwise equal) kernel path for weights that do, even under no_grad
    reference.requires_grad_(False)
    hf = tmp_path_factory.mktemp("hf")
    reference.save_pretrained(hf, max_shard_size="100KB")
    store_dir = os.path.join(_disk_dir(tmp_path_factory), "store")
    layout = convert(str(hf), store_dir, dtype="auto")
    return reference, store_dir, layout


def _layer_bytes(layout) -> int:
    return max(u.nbytes for u in layout.units if u.layer is not None)


def _ids(batch: int, length: int = 11) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(3, 256, (batch, length), generator=g)


@pytest.mark.parametrize("granularity", ["layer", "matrix"])
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_is_bitwise_equal(converted, granularity, batch):
    reference, store_dir, layout = converted
    layer = _layer_bytes(layout)
    # room for two streaming layers and the small modules; one layer's worth of pinned cache
    model = load(store_dir, device="cpu", gpu_bytes=3 * layer, pinned_bytes=2 * layer,
                 granularity=granularity)  # fmt: skip
    try:
        ids = _ids(batch)
        with torch.no_grad():
            want = reference(ids).logits
            for _ in range(2):  # the second pass runs on the plan's resident sets
                got = model(ids).logits
                assert torch.equal(got, want)
        stats = model.infinity.stats()
        assert stats["steps"] >= 2 * 3  # every layer was streamed through the hooks, twice
        assert stats["disk_bytes"] > 0
    finally:
        model.infinity.close()


@pytest.mark.parametrize("granularity", ["layer", "matrix"])
def test_warm_up_reads_no_weights_and_changes_nothing(converted, granularity):
    """The load-time forward on placeholder weights (on by default only on CUDA)."""
    reference, store_dir, layout = converted
    layer = _layer_bytes(layout)
    model = load(store_dir, device="cpu", gpu_bytes=3 * layer, pinned_bytes=2 * layer,
                 granularity=granularity, warm_up=True)  # fmt: skip
    try:
        assert model.infinity.stats()["disk_bytes"] == 0  # nothing streamed yet
        streamed = [s.meta for u in model.infinity.units for s in u.slots]
        assert streamed and all(p.is_meta for p in streamed)
        assert all(p.is_meta for p in model.model.layers.parameters())  # hooks put meta back
        ids = _ids(2)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, reference(ids).logits)
    finally:
        model.infinity.close()


def test_generate_with_kv_cache_batch_and_padding(converted):
    reference, store_dir, layout = converted
    model = load(store_dir, device="cpu", gpu_bytes=3 * _layer_bytes(layout), pinned_bytes=0)
    try:
        ids = _ids(2, 9)
        mask = torch.ones_like(ids)
        ids[1, :3], mask[1, :3] = 0, 0  # left padding on the second row
        kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False,
                  return_dict_in_generate=True, output_scores=True, pad_token_id=0)  # fmt: skip
        with torch.no_grad():
            want = reference.generate(ids, **kw)
            got = model.generate(ids, **kw)
        assert torch.equal(got.sequences, want.sequences)
        for a, b in zip(got.scores, want.scores, strict=True):
            assert torch.equal(a, b)
    finally:
        model.infinity.close()


def test_pinned_budget_holding_the_model_reads_the_disk_once(converted):
    reference, store_dir, layout = converted
    total = sum(u.nbytes for u in layout.units)
    layer = _layer_bytes(layout)
    model = load(store_dir, device="cpu", gpu_bytes=3 * layer, pinned_bytes=total + 2 * layer)
    try:
        ids = _ids(1)
        with torch.no_grad():
            model(ids)
            first = model.infinity.stats()["disk_bytes"]
            model(ids)
            model(ids)
            again = model.infinity.stats()["disk_bytes"]
        assert 0 < first <= total
        assert again == first, "passes after the first must hit the pinned tier"
    finally:
        model.infinity.close()


def test_fp8_is_close_to_the_full_precision_model(converted, tmp_path_factory):
    reference, _, _ = converted
    hf = tmp_path_factory.mktemp("hf8")
    reference.save_pretrained(hf)
    store_dir = os.path.join(_disk_dir(tmp_path_factory), "fp8")
    layout = convert(str(hf), store_dir, dtype="fp8")
    assert any(r.dtype == "float8_e4m3fn" for r in layout.tensors.values())
    model = load(store_dir, device="cpu", gpu_bytes=1 << 30, pinned_bytes=1 << 20)
    try:
        ids = _ids(2)
        with torch.no_grad():
            want = copy.deepcopy(reference).to(torch.bfloat16)(ids).logits.float()
            got = model(ids).logits.float()
        err = (got - want).norm() / want.norm()
        assert err < 0.1, f"fp8 logits off by {err:.3f} (relative L2) against bf16"
        assert not torch.equal(got, want)  # it really is quantised
    finally:
        model.infinity.close()


def test_budget_below_one_streaming_layer_says_so(converted):
    _, store_dir, layout = converted
    with pytest.raises((CapacityError, ConfigError), match=r"\d"):
        load(store_dir, device="cpu", gpu_bytes=_layer_bytes(layout) // 2, pinned_bytes=0)


def test_closed_model_says_so(converted):
    _, store_dir, layout = converted
    model = load(store_dir, device="cpu", gpu_bytes=3 * _layer_bytes(layout), pinned_bytes=0)
    model.infinity.close()
    with pytest.raises(RuntimeError, match="closed"), torch.no_grad():
        model(_ids(1))


def test_not_a_converted_store(tmp_path):
    with pytest.raises(InfinityError):
        load(str(tmp_path), device="cpu")


def test_unknown_granularity(converted):
    _, store_dir, _ = converted
    with pytest.raises(ConfigError, match="granularity"):
        load(store_dir, device="cpu", granularity="row")


@pytest.mark.gpu
def test_cuda_forward_and_generate_match_in_memory(converted):
    reference, store_dir, layout = converted
    layer = _layer_bytes(layout)
    on_gpu = reference.to("cuda")
    try:
        for granularity in ("layer", "matrix"):
            model = load(store_dir, device="cuda", gpu_bytes=3 * layer, pinned_bytes=2 * layer,
                         granularity=granularity)  # fmt: skip
            try:
                ids = _ids(3).cuda()
                with torch.no_grad():
                    want = on_gpu(ids).logits
                    for _ in range(3):  # same kernels on the same weights
                        torch.testing.assert_close(model(ids).logits, want, rtol=1e-6, atol=1e-6)
                    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
                    assert torch.equal(model.generate(ids, **kw), on_gpu.generate(ids, **kw))
                assert model.infinity.stats()["peak_gpu_bytes"] > 0
            finally:
                model.infinity.close()
    finally:
        reference.to("cpu")


def test_generate_command_prints_the_in_memory_models_text(tmp_path_factory):
    from click.testing import CliRunner

    from infinity.cli import main
    from infinity.inference.demo import build_checkpoint

    hf = str(tmp_path_factory.mktemp("hfcli"))
    reference, tokenizer = build_checkpoint(hf, layers=2, hidden=64)
    reference.requires_grad_(False)
    store_dir = os.path.join(_disk_dir(tmp_path_factory), "cli")
    convert(hf, store_dir)
    prompt = "The quick brown fox"
    result = CliRunner().invoke(
        main,
        ["generate", store_dir, "--prompt", prompt, "--max-new-tokens", "5", "--batch-size",
         "2", "--device", "cpu", "--gpu-bytes", "1MiB", "--pinned-bytes", "0", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    ids = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        out = reference.generate(**ids, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    want = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert doc["texts"] == [want, want]
    assert doc["new_tokens"] == 5 and doc["batch_size"] == 2
    assert doc["stats"]["steps"] == 5 * 2  # 2 layers streamed for each of the 5 forwards
    assert doc["tokens_per_s"] > 0


def test_two_layers_of_pinned_memory_stream_without_fallback(converted, caplog):
    reference, store_dir, layout = converted
    probe = load(store_dir, device="cpu", gpu_bytes=1 << 30, pinned_bytes=0)
    largest = max(u.nbytes for u in probe.infinity.units)  # as planned: aligned per key
    probe.infinity.close()
    model = load(store_dir, device="cpu", gpu_bytes=3 * largest, pinned_bytes=2 * largest)
    try:
        ids = _ids(1)
        with torch.no_grad(), caplog.at_level("WARNING", logger="infinity.inference.stream"):
            for _ in range(3):
                assert torch.equal(model(ids).logits, reference(ids).logits)
        assert "failed" not in caplog.text
    finally:
        model.infinity.close()
