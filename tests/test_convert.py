"""infinity convert on tiny random Llama, Mistral and Qwen2 checkpoints, sharded, into real stores:
bytes, order, contiguity, fp8, resume after an exception or kill -9, errors, the CLI."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from store_helpers import small_config
from torch import nn

from infinity import CapacityError, ConfigError
from infinity.cli import main
from infinity.errors import IntegrityError, StorageIOError
from infinity.inference import convert
from infinity.inference.convert import COPIED, plan_layout, quantize_fp8
from infinity.inference.layout import ModelLayout
from infinity.store import TieredStore
from infinity.store import manifest as mf

CONVERT_MODULE = sys.modules["infinity.inference.convert"]
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "vocab_size": 256}
SIZES |= {"num_attention_heads": 4, "num_key_value_heads": 2}
ARCHS = {  # name -> (config class, kwargs, checkpoint dtype)
    "llama": ("LlamaConfig", {}, torch.bfloat16),
    "mistral": ("MistralConfig", {}, torch.float32),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}, torch.bfloat16),
}
_CACHE: dict[str, str] = {}


def checkpoint(tmp_path_factory, arch: str) -> str:
    """A sharded tiny random checkpoint (50 KB shards + index) with a real tokenizer."""
    if arch in _CACHE:  # one per session: tmp_path_factory is session-wide
        return _CACHE[arch]
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    cls, extra, dtype = ARCHS[arch]
    torch.manual_seed(sum(map(ord, arch)))
    config = getattr(transformers, cls)(**SIZES, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():  # norms too: nothing may be all ones
            p.add_(torch.randn_like(p) * 0.05)
    path = str(tmp_path_factory.mktemp(f"hf-{arch}"))
    model.save_pretrained(path, max_shard_size="50KB")
    vocab = {f"w{i}": i for i in range(255)} | {"<unk>": 255}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast
    fast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    Path(path, "chat_template.jinja").write_text("{{ messages[0].content }}")
    return _CACHE.setdefault(arch, path)


def checkpoint_tensors(hf_dir: str) -> dict[str, torch.Tensor]:
    with open(os.path.join(hf_dir, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    files = {n: safe_open(f"{hf_dir}/{n}", framework="pt") for n in set(weight_map.values())}
    return {name: files[file].get_tensor(name) for name, file in weight_map.items()}


def run_convert(hf_dir, store_dir, dtype="auto", **kw) -> ModelLayout:
    return convert(hf_dir, store_dir, dtype, store_config=small_config(pinned_bytes=0), **kw)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits = (a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(*bits)


def assert_contiguous(layout: ModelLayout) -> None:
    """Every key in storage order starts where the previous one's 4 KiB blocks end."""
    (data_dir,) = layout.store_paths
    entries = mf.read_manifest(data_dir)["entries"]
    assert set(entries) == set(layout.tensors)
    offset = 0
    for key in (k for u in layout.units for k in layout.unit_keys(u.name)):
        ((file, at, nbytes),) = entries[key]["extents"]
        assert (file, at, nbytes) == (0, offset, layout.tensors[key].nbytes), key
        offset += -(-nbytes // 4096) * 4096


def store_state(layout: ModelLayout) -> dict:
    with TieredStore.open(layout.store_paths, small_config(), readonly=True) as store:
        return {k: (store.entry(k).checksum, store.entry(k).version) for k in store.keys()}


@pytest.mark.parametrize("dtype", ["auto", "fp32"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_convert_stores_the_checkpoint_bitwise(tmp_path_factory, tmp_path, arch, dtype):
    hf_dir = checkpoint(tmp_path_factory, arch)
    store_dir = tmp_path / "store"
    seen = []
    layout = run_convert(hf_dir, store_dir, dtype, progress=lambda *a: seen.append(a))

    assert layout == ModelLayout.load(store_dir) and layout.complete
    names = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(3)), "model.norm"]
    assert [u.name for u in layout.units] == [*names, "lm_head"]
    assert [u.layer for u in layout.units] == [None, 0, 1, 2, None, None]
    assert layout.layers_path == "model.layers" and layout.store_paths == [str(store_dir / "data")]
    want = ARCHS[arch][2] if dtype == "auto" else torch.float32
    assert layout.compute_dtype == str(want).removeprefix("torch.")
    if arch == "qwen2":
        assert layout.tied == {"lm_head.weight": "model.embed_tokens.weight"}
        assert layout.units[-1].tensors == () and layout.units[-1].nbytes == 0
    else:
        assert layout.tied == {} and layout.units[-1].tensors == ("lm_head.weight",)
    total = sum(u.nbytes for u in layout.units)
    assert [s[2] for s in seen] == ["", *(u.name for u in layout.units)] and seen[0][0] == 0
    assert seen[-1][:2] == (total, total) and all(s[1] == total for s in seen)

    source = checkpoint_tensors(hf_dir)
    assert set(layout.tensors) == set(source)  # lm_head of qwen2 was never saved: tied
    with TieredStore.open(layout.store_paths, small_config(), readonly=True) as store:
        assert set(store.keys()) == set(source)
        for name, record in layout.tensors.items():
            got = store.get(record.key)
            assert same_bytes(got, source[name].to(want)), name
            assert record.dtype == str(want).removeprefix("torch.") and record.scale_key is None
            assert record.nbytes == got.nbytes and record.shape == tuple(got.shape)
    for unit in layout.units:
        assert unit.nbytes == sum(layout.tensors[t].nbytes for t in unit.tensors)
        assert all(layout.tensors[t].unit == unit.name for t in unit.tensors)
    assert_contiguous(layout)

    copied = [n for n in COPIED if os.path.exists(os.path.join(hf_dir, n))]
    assert {"config.json", "tokenizer.json", "chat_template.jinja"} <= set(copied)
    assert all(Path(hf_dir, n).read_bytes() == (store_dir / n).read_bytes() for n in copied)


def test_fp8_round_trip(tmp_path_factory, tmp_path):
    hf_dir = checkpoint(tmp_path_factory, "qwen2")
    layout = run_convert(hf_dir, tmp_path / "store", "fp8")
    assert layout.compute_dtype == "bfloat16" and layout.dtype == "fp8"
    source = checkpoint_tensors(hf_dir)
    with TieredStore.open(layout.store_paths, small_config(), readonly=True) as store:
        for name, w in source.items():
            record = layout.tensors[name]
            got = store.get(name)
            if name.startswith("model.layers.") and w.dim() == 2:
                assert record.scale_key == name + ".scale" and got.dtype == torch.float8_e4m3fn
                assert record.dtype == "float8_e4m3fn"
                assert layout.tensors[record.scale_key].unit == record.unit
                scale = store.get(record.scale_key)
                assert scale.dtype == torch.float32 and scale.shape == (w.shape[0],)
                amax = w.float().abs().amax(dim=1)
                torch.testing.assert_close(scale, amax / 448)
                error = (got.float() * scale[:, None] - w.float()).abs()
                assert (error <= amax[:, None] / 16).all(), name
            else:  # norms, biases, embeddings
                assert record.scale_key is None and same_bytes(got, w.to(torch.bfloat16)), name
    assert sum(r.scale_key is not None for r in layout.tensors.values()) == 3 * 7
    assert_contiguous(layout)


def test_quantize_fp8_zero_rows_and_extremes():
    w = torch.tensor([[0.0, 0.0, 0.0], [1.0, -448.0 * 3, 2.0], [1e-3, 2e-3, -4e-3]])
    q, scale = quantize_fp8(w)
    assert scale.tolist()[0] == 1.0 and q[0].float().abs().sum() == 0
    assert q.float().abs().amax(dim=1)[1:].tolist() == [448.0, 448.0]
    torch.testing.assert_close(q.float() * scale[:, None], w, rtol=1 / 16, atol=0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    hf_dir = checkpoint(tmp_path_factory, "llama")
    layout = run_convert(hf_dir, tmp_path_factory.mktemp("reference") / "store", "fp8")
    return hf_dir, layout, store_state(layout)


def test_resume_after_an_exception_between_units(reference, tmp_path):
    hf_dir, ref_layout, ref_state = reference
    store_dir = tmp_path / "store"

    def stop(done, total, unit):
        if unit == "model.layers.0":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_convert(hf_dir, store_dir, "fp8", progress=stop)
    with pytest.raises(ConfigError, match="incomplete"):
        ModelLayout.load(store_dir)
    _resume_and_compare(hf_dir, store_dir, ref_layout, ref_state, expect_written=4)


def test_resume_after_an_exception_inside_a_unit(reference, tmp_path, monkeypatch):
    """close() commits the half-written layer: resume must rewrite it, not keep it."""
    hf_dir, ref_layout, ref_state = reference
    store_dir = tmp_path / "store"
    original, calls = TieredStore.put, []

    def put(self, key, tensor, tier="nvme"):
        calls.append(key)  # embed (1), layer 0 (7 weights + 7 scales + 2 norms), 5 of layer 1
        if len(calls) == 1 + 16 + 6:
            raise OSError("disk went away")
        return original(self, key, tensor, tier)

    monkeypatch.setattr(TieredStore, "put", put)
    with pytest.raises(OSError, match="disk went away"):
        run_convert(hf_dir, store_dir, "fp8")
    monkeypatch.undo()
    with TieredStore.open([store_dir / "data"], small_config(), readonly=True) as s:
        assert sum(k.startswith("model.layers.1.") for k in s.keys()) == 5  # committed by close
    _resume_and_compare(hf_dir, store_dir, ref_layout, ref_state, expect_written=4)


def test_resume_after_kill_9(reference, tmp_path):
    hf_dir, ref_layout, ref_state = reference
    store_dir = tmp_path / "store"
    child = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {TESTS_DIR!r})
        from store_helpers import small_config
        from infinity.inference import convert
        from infinity.store import TieredStore
        original, calls = TieredStore.put, [0]
        def put(self, key, tensor, tier="nvme"):
            original(self, key, tensor, tier)
            calls[0] += 1
            if calls[0] == 1 + 16 + 16 + 9:  # written, not flushed: mid layer 2
                os.kill(os.getpid(), signal.SIGKILL)
        TieredStore.put = put
        convert({hf_dir!r}, {str(store_dir)!r}, "fp8", store_config=small_config(pinned_bytes=0))
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    with TieredStore.open([store_dir / "data"], small_config(), readonly=True) as s:
        assert not any(k.startswith("model.layers.2.") for k in s.keys())
        assert any(k.startswith("model.layers.1.") for k in s.keys())
    _resume_and_compare(hf_dir, store_dir, ref_layout, ref_state, expect_written=3)


def _resume_and_compare(hf_dir, store_dir, ref_layout, ref_state, expect_written):
    seen = []
    layout = run_convert(hf_dir, store_dir, "fp8", progress=lambda *a: seen.append(a[2]))
    assert len(seen) == 1 + expect_written  # the units already stored were not written again
    assert layout.complete and ModelLayout.load(store_dir) == layout
    assert replace(layout, store_paths=[]) == replace(ref_layout, store_paths=[])
    assert store_state(layout) == ref_state  # same keys, checksums and versions
    assert_contiguous(layout)


def test_rerun_is_a_no_op_and_mismatches_are_refused(tmp_path_factory, tmp_path):
    hf_dir = checkpoint(tmp_path_factory, "mistral")
    store_dir = tmp_path / "store"
    first = run_convert(hf_dir, store_dir, "bf16")
    generation = mf.read_manifest(first.store_paths[0])["generation"]
    seen = []
    assert run_convert(hf_dir, store_dir, "bf16", progress=lambda *a: seen.append(a)) == first
    assert seen == [] and mf.read_manifest(first.store_paths[0])["generation"] == generation
    with pytest.raises(ConfigError, match="dtype 'bf16', not 'fp16'.*--overwrite"):
        run_convert(hf_dir, store_dir, "fp16")
    with pytest.raises(ConfigError, match="another checkpoint"):
        run_convert(checkpoint(tmp_path_factory, "llama"), store_dir, "bf16")
    doc = json.loads((store_dir / "model.json").read_text())
    (store_dir / "model.json").write_text(json.dumps(doc | {"version": 2}))
    with pytest.raises(ConfigError, match="newer infinity .*version 2"):
        ModelLayout.load(store_dir)
    layout = run_convert(hf_dir, store_dir, "fp16", overwrite=True)
    assert layout.dtype == "fp16" and ModelLayout.load(store_dir).dtype == "fp16"
    with TieredStore.open(layout.store_paths, small_config(), readonly=True) as store:
        assert {store.entry(k).dtype for k in store.keys()} == {torch.float16}
        assert {store.entry(k).version for k in store.keys()} == {1}
    assert_contiguous(layout)


def test_errors_on_missing_or_unusable_checkpoints(tmp_path_factory, tmp_path):
    store_dir = tmp_path / "store"
    with pytest.raises(ConfigError, match="does not exist"):
        run_convert(tmp_path / "nowhere", store_dir)
    (empty := tmp_path / "empty").mkdir()
    (empty / "README.md").write_text("hi")
    with pytest.raises(ConfigError, match=r"no config.json \(it holds: README.md\)"):
        run_convert(empty, store_dir)
    pickles = tmp_path / "pickles"
    shutil.copytree(checkpoint(tmp_path_factory, "llama"), pickles)
    for name in os.listdir(pickles):
        if "safetensors" in name:
            os.remove(pickles / name)
    torch.save({}, pickles / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="pickle weights .*pytorch_model.bin.*save_pretrained"):
        run_convert(pickles, store_dir)
    shard = tmp_path / "shard"
    shutil.copytree(checkpoint(tmp_path_factory, "llama"), shard)
    gone = sorted(n for n in os.listdir(shard) if n.endswith(".safetensors"))[1]
    os.remove(shard / gone)
    with pytest.raises(ConfigError, match=f"{gone}; the download is incomplete"):
        run_convert(shard, store_dir)
    assert not store_dir.exists()  # nothing written by any of them


def test_links_that_leave_the_checkpoint_are_refused(tmp_path_factory, tmp_path):
    """A tokenizer.json (any copied file, config.json, a shard) linked to a file elsewhere on the
    system must not be read or copied into the store; nor a FIFO or a directory in its place."""
    (secret := tmp_path / "secret").write_text("not yours")
    hf_dir, store_dir = tmp_path / "hf", tmp_path / "store"
    shutil.copytree(checkpoint(tmp_path_factory, "llama"), hf_dir)
    shard = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors"))[0]
    for name in ["tokenizer.json", "chat_template.jinja", "config.json", shard]:
        os.replace(hf_dir / name, tmp_path / name)
        os.symlink(tmp_path / name if name != "tokenizer.json" else secret, hf_dir / name)
        with pytest.raises(ConfigError, match=f"{hf_dir / name} is a symbolic link to .*outside"):
            run_convert(hf_dir, store_dir)
        os.remove(hf_dir / name)
        os.replace(tmp_path / name, hf_dir / name)
    for kind, make, remove in (
        ("FIFO \\(named pipe\\)", os.mkfifo, os.remove),
        ("directory", os.mkdir, os.rmdir),
    ):
        os.replace(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
        make(hf_dir / "tokenizer.json")
        with pytest.raises(ConfigError, match=f"tokenizer.json is a {kind}, not a regular file"):
            run_convert(hf_dir, store_dir)
        remove(hf_dir / "tokenizer.json")
        os.replace(tmp_path / "tokenizer.json", hf_dir / "tokenizer.json")
    assert not store_dir.exists()  # refused before anything was written
    (hf_dir / "sub").mkdir()  # a link that stays inside the checkpoint is fine
    os.replace(hf_dir / "tokenizer.json", hf_dir / "sub" / "tokenizer.json")
    os.symlink("sub/tokenizer.json", hf_dir / "tokenizer.json")
    run_convert(hf_dir, store_dir)
    copied = store_dir / "tokenizer.json"
    assert (
        not copied.is_symlink() and copied.read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    )


def test_hugging_face_cache_snapshots_convert(tmp_path_factory, tmp_path):
    """The Hub cache keeps every file in blobs/ and links snapshots/REV/NAME -> ../../blobs/HASH."""
    source = checkpoint(tmp_path_factory, "llama")
    repo = tmp_path / "hub" / "models--org--tiny"
    (blobs := repo / "blobs").mkdir(parents=True)
    (snapshot := repo / "snapshots" / "0123abc").mkdir(parents=True)
    names = sorted(os.listdir(source))
    for i, name in enumerate(names):
        shutil.copyfile(os.path.join(source, name), blobs / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snapshot / name)
    layout = run_convert(snapshot, tmp_path / "store")
    assert layout.complete and set(store_state(layout)) == set(layout.tensors)
    for name in set(COPIED) & set(names):
        copied = tmp_path / "store" / name
        assert not copied.is_symlink() and copied.read_bytes() == Path(source, name).read_bytes()
    other = tmp_path / "hub" / "models--org--other" / "blobs"  # another repository's blobs
    other.mkdir(parents=True)
    os.replace(blobs / "blob0", other / "blob0")
    os.remove(snapshot / names[0])
    os.symlink("../../../models--org--other/blobs/blob0", snapshot / names[0])
    with pytest.raises(ConfigError, match="is a symbolic link to .*models--org--other"):
        run_convert(snapshot, tmp_path / "store2")


def test_store_and_checkpoint_must_not_overlap(tmp_path_factory, tmp_path):
    hf_dir = tmp_path / "hf"
    shutil.copytree(checkpoint(tmp_path_factory, "llama"), hf_dir)
    before = sorted(os.listdir(hf_dir))
    config = (hf_dir / "config.json").read_bytes()
    os.symlink(hf_dir, tmp_path / "alias")
    cases = [
        (hf_dir, hf_dir, {}),  # convert D D
        (hf_dir, tmp_path / "alias", {}),  # the same directory by another name
        (hf_dir, hf_dir / "store", {}),  # the store inside the checkpoint
        (hf_dir, tmp_path / "store", {"nvme_paths": [hf_dir / "data"]}),  # its data inside it
        (tmp_path, tmp_path / "store", {}),  # the checkpoint inside the store
    ]
    for source, store, kw in cases:
        with pytest.raises(ConfigError, match="overlap .*give a STORE_DIR .*outside"):
            run_convert(source, store, **kw)
    assert sorted(os.listdir(hf_dir)) == before and (hf_dir / "config.json").read_bytes() == config
    assert not (tmp_path / "store").exists()


def test_absurd_dimensions_are_refused_before_building(tmp_path_factory, tmp_path):
    hf_dir = tmp_path / "hf"
    shutil.copytree(checkpoint(tmp_path_factory, "llama"), hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    for change, message in [
        ({"num_hidden_layers": 2048}, "num_hidden_layers = 2048 is not a whole number"),
        ({"num_hidden_layers": 1e5}, "num_hidden_layers = 100000.0 is not a whole number"),
        ({"hidden_size": -64}, "hidden_size = -64 is not"),
        ({"vocab_size": "32000"}, "vocab_size = '32000' is not"),
        ({"text_config": {"intermediate_size": 10**12}}, "text_config.intermediate_size"),
    ]:
        (hf_dir / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ConfigError, match=re.escape(message)):
            plan_layout(hf_dir)


def test_a_base_model_checkpoint_converts_as_from_pretrained_loads_it(tmp_path):
    """Names without the "model." prefix get it (from_pretrained adds it); a head that is not
    there is refused (from_pretrained would make it up at random), then the quantized refusal."""
    from transformers import LlamaConfig, LlamaModel

    hf_dir = tmp_path / "base"
    LlamaModel(LlamaConfig(**SIZES, tie_word_embeddings=True)).save_pretrained(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (hf_dir / "config.json").write_text(json.dumps(config))
    layout = run_convert(hf_dir, tmp_path / "tied")
    assert layout.complete and layout.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "model.layers.0.self_attn.q_proj.weight" in layout.tensors
    config["tie_word_embeddings"] = False
    (hf_dir / "config.json").write_text(json.dumps(config))
    message = r"lacks 1 parameters of LlamaForCausalLM .*: lm_head\.weight: .*at random"
    with pytest.raises(ConfigError, match=message):
        run_convert(hf_dir, tmp_path / "store")
    config["quantization_config"] = {"quant_method": "fp8"}
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"quantized checkpoint \(fp8\)"):
        run_convert(hf_dir, tmp_path / "store")


def test_blocks_that_are_not_one_module_list_are_refused(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

    class SplitConfig(PretrainedConfig):
        model_type = "infinity-split-test"

        def __init__(self, hidden_size=16, num_hidden_layers=4, vocab_size=32, **kw):
            self.hidden_size, self.num_hidden_layers = hidden_size, num_hidden_layers
            self.vocab_size = vocab_size
            super().__init__(**kw)

    class SplitForCausalLM(PreTrainedModel):
        config_class = SplitConfig

        def __init__(self, config):
            super().__init__(config)
            h, half = config.hidden_size, config.num_hidden_layers // 2
            self.embed = nn.Embedding(config.vocab_size, h)
            self.first = nn.ModuleList(nn.Linear(h, h) for _ in range(half))
            self.second = nn.ModuleList(nn.Linear(h, h) for _ in range(half))
            self.post_init()

    AutoConfig.register("infinity-split-test", SplitConfig, exist_ok=True)
    AutoModelForCausalLM.register(SplitConfig, SplitForCausalLM, exist_ok=True)
    SplitForCausalLM(SplitConfig()).save_pretrained(tmp_path / "split")
    message = "SplitForCausalLM is not supported: its decoder blocks are not one nn.ModuleList"
    with pytest.raises(ConfigError, match=message + r" \(ModuleLists of num_hidden_layers=4.*none"):
        run_convert(tmp_path / "split", tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_not_enough_space_on_a_small_filesystem(tmp_path_factory, tmp_path, small_fs):
    hf_dir = checkpoint(tmp_path_factory, "llama")
    fill = (shutil.disk_usage(small_fs).free - 100_000) // 4096 * 4096
    subprocess.run(["fallocate", "-l", str(fill), os.path.join(small_fs, "filler")], check=True)
    assert shutil.disk_usage(small_fs).free < 150_000  # the tiny model needs about 300 KB
    nvme = os.path.join(small_fs, "nvme")
    with pytest.raises(CapacityError, match=r"GB to write .*GB free .* on .*nvme.*--nvme-path"):
        run_convert(hf_dir, tmp_path / "store", nvme_paths=[nvme])
    assert not os.path.exists(nvme) and not (tmp_path / "store").exists()


def test_not_enough_space_counts_every_tensor(tmp_path_factory, tmp_path, monkeypatch):
    """Runs without root: disk_usage is replaced for this check only (convert's own import)."""
    hf_dir = checkpoint(tmp_path_factory, "qwen2")
    layout, _ = plan_layout(hf_dir)
    need = sum(-(-r.nbytes // 4096) * 4096 for r in layout.tensors.values())
    real = shutil.disk_usage

    def fake(path, free=need - 1):
        return real(path)._replace(free=free)

    monkeypatch.setattr(CONVERT_MODULE.shutil, "disk_usage", fake)
    message = rf"GB to write \({need:,} bytes\), .* GB free \({need - 1:,} bytes\)"
    with pytest.raises(CapacityError, match=message):
        run_convert(hf_dir, tmp_path / "store")
    assert not (tmp_path / "store").exists()
    monkeypatch.setattr(CONVERT_MODULE.shutil, "disk_usage", lambda p: fake(p, need))
    assert run_convert(hf_dir, tmp_path / "store").complete


def test_cli_convert(tmp_path_factory, tmp_path):
    hf_dir = checkpoint(tmp_path_factory, "llama")
    store_dir, a, b = tmp_path / "store", tmp_path / "nvme-a", tmp_path / "nvme-b"
    args = ["convert", hf_dir, str(store_dir), "--dtype", "bf16", "--nvme-path", str(a)]
    result = CliRunner().invoke(main, [*args, "--nvme-path", str(b), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    layout = ModelLayout.load(store_dir)
    assert layout.store_paths == [str(a), str(b)] and layout.dtype == "bf16"
    assert summary["units"] == 6 and summary["layers"] == 3 and summary["tensors"] == 30
    stored = sum(r.nbytes for r in layout.tensors.values())
    assert summary["written_bytes"] == summary["stored_bytes"] == stored
    assert set(store_state(layout)) == set(layout.tensors)  # the store spans a and b
    result = CliRunner().invoke(main, args + ["--nvme-path", str(b)])
    assert result.exit_code == 0 and "already converted: nothing written" in result.output
    result = CliRunner().invoke(main, ["convert", hf_dir, str(tmp_path / "s2")])
    assert result.exit_code == 0, result.output
    assert "6 units (3 layers), 30 tensors" in result.output and "GB/s); " in result.output
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "nowhere"), str(store_dir)])
    assert isinstance(result.exception, ConfigError)


def test_a_shard_cut_short_while_converting_leaves_it_incomplete(reference, tmp_path):
    """The bytes are read at the header's offsets (pread, no mmap): a shard truncated after the
    plan is an IntegrityError naming it (not a SIGBUS); model.json stays incomplete, so a load
    says to run convert again, and once the shard is back the rerun resumes to the same store."""
    _, ref_layout, ref_state = reference
    hf_dir, store_dir = tmp_path / "hf", tmp_path / "store"
    shutil.copytree(reference[0], hf_dir)  # copy2: the mtimes, so the fingerprint, are kept
    _, sources = plan_layout(hf_dir, "fp8")
    victim = sources["model.layers.2.mlp.down_proj.weight"]
    original, st = Path(victim.file).read_bytes(), os.stat(victim.file)

    def cut(done, total, unit):
        if unit == "model.layers.0":
            os.truncate(victim.file, victim.file_offset + 10)

    message = (
        rf"{re.escape(victim.file)} ends at byte [\d,]+, inside model\.layers\.[12]\..*cut short"
    )
    with pytest.raises(IntegrityError, match=message):
        run_convert(hf_dir, store_dir, "fp8", progress=cut)
    with pytest.raises(ConfigError, match=r"is incomplete .*run `infinity convert .* again"):
        ModelLayout.load(store_dir)
    Path(victim.file).write_bytes(original)
    os.utime(victim.file, ns=(st.st_atime_ns, st.st_mtime_ns))
    seen = []
    layout = run_convert(hf_dir, store_dir, "fp8", progress=lambda *a: seen.append(a[2]))
    assert 1 < len(seen) < 1 + len(layout.units)  # resumed: the first units were kept
    assert layout.complete and layout.tensors == ref_layout.tensors
    assert store_state(layout) == ref_state
    assert_contiguous(layout)


def test_a_refused_start_takes_back_what_it_made(tmp_path_factory, tmp_path, monkeypatch):
    """A fresh conversion that fails before writing (the store cannot open, O_DIRECT refused)
    removes the files and directories it made; an earlier conversion's files are kept."""
    hf_dir = checkpoint(tmp_path_factory, "llama")

    def refuse(*args, **kwargs):
        raise StorageIOError(str(args[0][0]), 0, 0, 5, "the drive went away")

    with monkeypatch.context() as m:
        m.setattr(TieredStore, "open", refuse)
        with pytest.raises(StorageIOError, match="the drive went away"):
            run_convert(hf_dir, tmp_path / "deep" / "store")
        assert os.listdir(tmp_path) == []  # deep/, store/, data/, configs, model.json: gone
        (tmp_path / "kept").mkdir()  # STORE_DIR exists: it stays, empty
        with pytest.raises(StorageIOError):
            run_convert(hf_dir, tmp_path / "kept", nvme_paths=[tmp_path / "nvme"])
        assert os.listdir(tmp_path) == ["kept"] and os.listdir(tmp_path / "kept") == []
    with monkeypatch.context() as m:
        m.setattr(CONVERT_MODULE, "probe_direct_io", lambda p: "open(O_DIRECT) failed: nope")
        with pytest.raises(StorageIOError, match=r"cannot use O_DIRECT there \(open\(O_DIRECT"):
            run_convert(hf_dir, tmp_path / "store")
        assert not (tmp_path / "store").exists()

    def stop(done, total, unit):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # an earlier, incomplete conversion
        run_convert(hf_dir, tmp_path / "store", progress=stop)
    before = sorted(os.listdir(tmp_path / "store"))
    with monkeypatch.context() as m, pytest.raises(StorageIOError):
        m.setattr(TieredStore, "open", refuse)
        run_convert(hf_dir, tmp_path / "store")
    assert sorted(os.listdir(tmp_path / "store")) == before and "model.json" in before


def test_store_dir_that_is_a_file_is_refused(tmp_path_factory, tmp_path):
    (store := tmp_path / "store").write_text("mine")
    with pytest.raises(ConfigError, match="STORE_DIR .* exists and is not a directory"):
        run_convert(checkpoint(tmp_path_factory, "llama"), store)
    with pytest.raises(ConfigError, match="store path .*store exists and is not a directory"):
        run_convert(checkpoint(tmp_path_factory, "llama"), tmp_path / "s", nvme_paths=[store])
    assert store.read_text() == "mine" and not (tmp_path / "s").exists()
