"""convert accepts what from_pretrained loads: tiny random checkpoints of many families, saved by
transformers (some under old names it renames on load: GPT-NeoX's embed_out, Mixtral's
per-expert weights) or written by hand under legacy names, stream to logits equal, bitwise on the
CPU, to the model from_pretrained loads; what cannot stream is refused with the reason."""

import os

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from store_helpers import SMALL_AIO, small_config
from transformers import AutoModelForCausalLM

from infinity import ConfigError
from infinity.inference import convert, load
from infinity.inference.convert import plan_layout
from infinity.inference.layout import ModelLayout
from infinity.store import TieredStore

DENSE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
DENSE |= dict(num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, pad_token_id=0)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
ROUTED = dict(n_routed_experts=4, first_k_dense_replace=1, n_group=1, topk_group=1)
GPT = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128)
FAMILIES = {  # name -> (config class, kwargs); heads tied or not, biases or not, as noted
    "llama": ("LlamaConfig", DENSE | dict(tie_word_embeddings=True, attention_bias=True,
                                          mlp_bias=True)),  # tied, biases
    "mistral": ("MistralConfig", DENSE),  # untied
    "qwen2": ("Qwen2Config", DENSE),  # untied, q/k/v biases
    "qwen3": ("Qwen3Config", DENSE | dict(head_dim=16, tie_word_embeddings=True)),  # q/k norms
    "gemma": ("GemmaConfig", DENSE | dict(head_dim=16)),  # tied, (1 + w) norms
    "gemma2": ("Gemma2Config", DENSE | dict(head_dim=16)),  # tied, soft-capping, sliding window
    "phi3": ("Phi3Config", DENSE),  # fused qkv_proj and gate_up_proj
    "phi": ("PhiConfig", DENSE),  # untied, biases everywhere, partial rotary
    "gpt2": ("GPT2Config", GPT),  # Conv1D, transformer.h, tied
    "gpt_bigcode": ("GPTBigCodeConfig", GPT),  # multi-query attention
    "gptj": ("GPTJConfig", GPT | dict(rotary_dim=8)),  # untied, head bias
    "gpt_neox": ("GPTNeoXConfig", {k: v for k, v in DENSE.items() if k != "num_key_value_heads"}),
    "falcon": ("FalconConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    vocab_size=256)),  # tied, transformer.h
    "bloom": ("BloomConfig", dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=256)),  # alibi
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=96, num_hidden_layers=2, vocab_size=256,
                              num_attention_heads=4, max_position_embeddings=128,
                              word_embed_proj_dim=64)),  # model.decoder.layers, learned positions
    "olmo2": ("Olmo2Config", DENSE),
    "starcoder2": ("Starcoder2Config", DENSE),  # tied, biases
    "stablelm": ("StableLmConfig", DENSE),
    "cohere": ("CohereConfig", DENSE),  # tied, logit scale
    "mixtral": ("MixtralConfig", DENSE | dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", DENSE | MOE | dict(num_experts=4, head_dim=16)),
    # persistent buffers whose values the checkpoint holds (router biases, layer scalars, xIELU)
    "glm4_moe": ("Glm4MoeConfig", DENSE | MOE | ROUTED | dict(head_dim=16)),
    "deepseek_v3": ("DeepseekV3Config", DENSE | MOE | ROUTED | dict(  # and MLA attention
        q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)),
    "gemma4_text": ("Gemma4TextConfig", DENSE | dict(head_dim=16, global_head_dim=16,
                                                     hidden_size_per_layer_input=0)),
    "apertus": ("ApertusConfig", DENSE),
}  # fmt: skip
BUFFERS = {  # family -> a persistent buffer from_pretrained loads from the checkpoint
    "glm4_moe": "model.layers.1.mlp.gate.e_score_correction_bias",
    "deepseek_v3": "model.layers.1.mlp.gate.e_score_correction_bias",
    "gemma4_text": "model.layers.1.layer_scalar",
    "apertus": "model.layers.0.mlp.act_fn.beta",
}
RENAMED = {  # families whose checkpoint, as save_pretrained writes it, from_pretrained renames
    "gpt_neox": ("embed_out.weight", "lm_head.weight"),
    "mixtral": ("model.layers.1.block_sparse_moe.experts.3.w3.weight",
                "model.layers.1.mlp.experts.gate_up_proj"),
    "qwen3_moe": ("model.layers.0.mlp.experts.2.down_proj.weight",
                  "model.layers.0.mlp.experts.down_proj"),
}  # fmt: skip


def random_model(family: str, seed: int = 0) -> torch.nn.Module:
    cls, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kwargs))
    saved = model.state_dict()
    with torch.no_grad():
        for p in model.parameters():  # norms too: nothing may be all ones or zeros
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():  # those saved: from_pretrained loads them
            if name in saved and b.is_floating_point():
                b.add_(torch.randn_like(b) * 0.5)
    return model.eval()


def checkpoint_names(hf_dir) -> set[str]:
    names = set()
    for f in os.listdir(hf_dir):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(hf_dir, f), framework="pt") as st:
                names |= set(st.keys())
    return names


def from_pretrained(hf_dir) -> torch.nn.Module:
    """transformers' own model of the checkpoint: loaded whole, nothing made up."""
    model, info = AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    # streamed parameters do not require grad; torch picks another (equally exact, not bitwise
    # equal) matmul path for weights that do
    return model.eval().requires_grad_(False)


def assert_streams_like(reference, store_dir, granularity="layer", batch=2) -> None:
    model = load(store_dir, device="cpu", gpu_bytes=1 << 30, pinned_bytes=0,
                 granularity=granularity, aio=SMALL_AIO)  # fmt: skip
    try:
        ids = torch.randint(3, 256, (batch, 9), generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = reference(ids).logits
            assert torch.equal(model(ids).logits, want)
        assert model.infinity.stats()["disk_bytes"] > 0  # it really streamed
    finally:
        model.infinity.close()


def run_convert(hf_dir, store_dir, **kw) -> ModelLayout:
    return convert(hf_dir, store_dir, store_config=small_config(pinned_bytes=0), **kw)


def store_state(layout: ModelLayout) -> dict:
    with TieredStore.open(layout.store_paths, small_config(), readonly=True) as store:
        return {k: (store.entry(k).checksum, store.entry(k).version) for k in store.keys()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_streams_like_from_pretrained(family, tmp_path):
    hf_dir = tmp_path / "hf"
    random_model(family).save_pretrained(hf_dir, max_shard_size="40KB")  # experts span shards
    reference = from_pretrained(hf_dir)
    layout = run_convert(hf_dir, tmp_path / "store")
    params = dict(reference.named_parameters(remove_duplicate=False))
    assert set(layout.tensors) | set(layout.tied) == set(params) | set(layout.buffers)
    if family in RENAMED:  # the names differ, and convert took what transformers renamed
        saved, loaded = RENAMED[family]
        assert saved in checkpoint_names(hf_dir) and saved not in params
        assert loaded in layout.tensors and loaded not in checkpoint_names(hf_dir)
    values = params | dict(reference.named_buffers())
    assert set(layout.buffers) == set(reference.state_dict()) - set(params)
    if family in BUFFERS:  # loaded from the checkpoint, not what the model computes at init
        fresh = random_model(family).__class__(reference.config).state_dict()[BUFFERS[family]]
        assert BUFFERS[family] in layout.buffers
        assert not torch.equal(values[BUFFERS[family]], fresh)
    with TieredStore.open(layout.store_paths, small_config(), readonly=True) as store:
        for name, record in layout.tensors.items():  # every value as from_pretrained has it
            assert torch.equal(store.get(record.key), values[name].detach()), name
    assert_streams_like(reference, tmp_path / "store")
    if family in ("gpt2", "opt", "mixtral"):  # leaves outside the Llama order, 3-D experts
        assert_streams_like(reference, tmp_path / "store", "matrix", batch=1)


def test_legacy_gpt2_names_without_prefix_and_with_buffers(tmp_path):
    """The original GPT-2 checkpoints: no "transformer." prefix, and the attention masks saved
    as tensors (h.N.attn.bias, h.N.attn.masked_bias) that are no parameters."""
    model = random_model("gpt2", seed=1)
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()}
    state.pop("lm_head.weight")  # tied: the original files do not hold it
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(128, 128)).view(1, 1, 128, 128)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    hf_dir = tmp_path / "gpt2"
    hf_dir.mkdir()
    model.config.save_pretrained(hf_dir)
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    assert not any(k.startswith("transformer.") for k in checkpoint_names(hf_dir))
    reference = from_pretrained(hf_dir)
    layout = run_convert(hf_dir, tmp_path / "store")
    assert "transformer.h.1.attn.c_attn.weight" in layout.tensors
    assert not any(k.endswith((".attn.bias", ".masked_bias")) for k in layout.tensors)
    assert_streams_like(reference, tmp_path / "store")


def test_mixtral_under_its_current_names_converts_too(tmp_path):
    """The fused experts written as the model names them (what a converted, re-saved checkpoint
    of another tool may hold): no converter runs, the names are taken as they are."""
    model = random_model("mixtral", seed=2)
    hf_dir = tmp_path / "fused"
    hf_dir.mkdir()
    model.config.save_pretrained(hf_dir)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    reference = from_pretrained(hf_dir)
    layout = run_convert(hf_dir, tmp_path / "store")
    assert layout.tensors["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 192, 64)
    assert_streams_like(reference, tmp_path / "store")


def test_a_one_to_many_conversion_and_its_resume(tmp_path, monkeypatch):
    """A mapping registered with transformers' own API (``register_checkpoint_conversion_mapping``)
    that splits a fused qkv_proj into q/k/v: save_pretrained writes it fused, from_pretrained and
    convert split it. A failure after q is written (k and v are waiting, made by the same run)
    leaves the layer to write again: the resumed store equals an uninterrupted one."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import Chunk, WeightConverter

    class FusedQkvConfig(LlamaConfig):
        model_type = "infinity-fused-qkv-test"

    class FusedQkvForCausalLM(LlamaForCausalLM):
        config_class = FusedQkvConfig

    transformers.AutoConfig.register(FusedQkvConfig.model_type, FusedQkvConfig, exist_ok=True)
    AutoModelForCausalLM.register(FusedQkvConfig, FusedQkvForCausalLM, exist_ok=True)
    targets = [f"self_attn.{p}_proj.weight" for p in "qkv"]
    fuse = WeightConverter("self_attn.qkv_proj.weight", targets, operations=[Chunk(dim=0)])
    register_checkpoint_conversion_mapping(FusedQkvForCausalLM.__name__, [fuse], overwrite=True)
    torch.manual_seed(3)
    config = FusedQkvConfig(**(DENSE | dict(num_key_value_heads=4)))  # q, k, v of one size
    hf_dir = tmp_path / "hf"
    FusedQkvForCausalLM(config).save_pretrained(hf_dir)
    assert "model.layers.1.self_attn.qkv_proj.weight" in checkpoint_names(hf_dir)
    reference = from_pretrained(hf_dir)

    whole = run_convert(hf_dir, tmp_path / "whole")
    assert whole.tensors["model.layers.1.self_attn.k_proj.weight"].shape == (64, 64)
    original, puts = TieredStore.put, []

    def put(self, key, tensor, tier="nvme"):
        puts.append(key)
        if key == "model.layers.1.self_attn.k_proj.weight":
            raise OSError("disk went away")
        return original(self, key, tensor, tier)

    monkeypatch.setattr(TieredStore, "put", put)
    with pytest.raises(OSError, match="disk went away"):
        run_convert(hf_dir, tmp_path / "store")
    monkeypatch.undo()
    assert "model.layers.1.self_attn.q_proj.weight" in puts  # written, then the failure
    seen = []
    layout = run_convert(hf_dir, tmp_path / "store", progress=lambda *a: seen.append(a[2]))
    assert seen == ["", "model.layers.1", "model.norm", "lm_head"]  # embed and layer 0 kept
    assert store_state(layout) == store_state(whole)
    assert_streams_like(reference, tmp_path / "store")


def test_a_converter_that_cannot_run_is_refused_before_writing(tmp_path):
    """A Mixtral checkpoint missing one expert's w3: transformers' stacking cannot make
    gate_up_proj (from_pretrained would leave it random); convert says so and writes nothing."""
    hf_dir = tmp_path / "hf"
    random_model("mixtral").save_pretrained(hf_dir)
    path = hf_dir / "model.safetensors"
    state = load_file(path)
    del state["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(state, path, metadata={"format": "pt"})
    message = (
        r"transformers' conversion of model\.layers\.1\.block_sparse_moe\.experts\.0\.w1\.weight"
        r".* into model\.layers\.1\.mlp\.experts\.gate_up_proj fails on these tensors' shapes"
    )
    with pytest.raises(ConfigError, match=message):
        run_convert(hf_dir, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_a_renamed_tensor_of_the_wrong_shape_is_named_both_ways(tmp_path):
    hf_dir = tmp_path / "hf"
    random_model("gpt_neox").save_pretrained(hf_dir)
    path = hf_dir / "model.safetensors"
    state = load_file(path)
    state["embed_out.weight"] = state["embed_out.weight"][:128].clone()  # half the vocabulary
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"embed_out\.weight \(loaded as lm_head\.weight\) has"):
        plan_layout(hf_dir)


def test_blocks_that_are_not_one_module_list_are_refused_by_name(tmp_path):
    """XLM (AutoModelForCausalLM loads XLMWithLMHeadModel) keeps each kind of sublayer in its
    own ModuleList: nothing is one block to stream."""
    config = transformers.XLMConfig(emb_dim=32, n_layers=2, n_heads=4, vocab_size=64)
    hf_dir = tmp_path / "xlm"
    AutoModelForCausalLM.from_config(config).save_pretrained(hf_dir)
    assert type(from_pretrained(hf_dir)).__name__ == "XLMWithLMHeadModel"  # transformers loads it
    message = (
        r"XLMWithLMHeadModel is not supported: its decoder blocks are not one nn\.ModuleList "
        r"\(ModuleLists of num_hidden_layers=2 modules: transformer\.attentions, "
    )
    with pytest.raises(ConfigError, match=message):
        run_convert(hf_dir, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_fp8_quantizes_layer_matrices_only(tmp_path):
    """Router biases (buffers) stay as the checkpoint has them, stacked 3-D experts in bf16;
    the 2-D layer matrices become fp8, and the logits stay close to the bf16 model's."""
    hf_dir = tmp_path / "hf"
    random_model("glm4_moe").save_pretrained(hf_dir)
    layout = run_convert(hf_dir, tmp_path / "store", dtype="fp8")
    dtypes = {name: r.dtype for name, r in layout.tensors.items()}
    assert dtypes[BUFFERS["glm4_moe"]] == "float32"
    assert dtypes["model.layers.1.mlp.experts.gate_up_proj"] == "bfloat16"
    assert dtypes["model.layers.1.self_attn.q_proj.weight"] == "float8_e4m3fn"
    reference = from_pretrained(hf_dir).to(torch.bfloat16)
    model = load(tmp_path / "store", device="cpu", gpu_bytes=1 << 30, pinned_bytes=0, aio=SMALL_AIO)
    try:
        ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            want, got = reference(ids).logits.float(), model(ids).logits.float()
        assert (got - want).norm() / want.norm() < 0.1
        assert not torch.equal(got, want)  # it really is quantised
    finally:
        model.infinity.close()
