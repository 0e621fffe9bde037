"""load() takes what from_pretrained takes: a Hugging Face folder (converted on first use, into
the cache or store_dir=, resumable), a Hub model id from the local cache when offline, a store;
and accelerate's max_memory spelling of the budgets."""

import os
import shutil

import huggingface_hub
import pytest
import torch
from store_helpers import SMALL_AIO
from transformers import AutoModelForCausalLM, LlamaConfig

from infinity import ConfigError
from infinity.inference import load
from infinity.inference.layout import ModelLayout
from infinity.inference.model import _max_memory
from infinity.inference.resolve import default_store_dir

SHAPES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, pad_token_id=0)  # fmt: skip
UNITS = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2",
         "model.norm", "lm_head"]  # fmt: skip
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("checkpoints") / "tiny-llama"
    AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(hf_dir):
    return AutoModelForCausalLM.from_pretrained(hf_dir).eval().requires_grad_(False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INFINITY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def stream(source, **kw):
    kw = {"device": "cpu", "gpu_bytes": 1 << 30, "pinned_bytes": 0, "aio": SMALL_AIO} | kw
    return load(source, **kw)


def assert_same_logits(model, reference) -> None:
    try:
        ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            assert torch.equal(model(ids).logits, reference(ids).logits)
    finally:
        model.infinity.close()


def test_a_folder_is_converted_on_first_use_into_the_cache(hf_dir, reference, cache):
    seen = []
    assert_same_logits(stream(hf_dir, progress=lambda *a: seen.append(a[2])), reference)
    assert seen == ["", *UNITS]  # converted, unit by unit
    store = default_store_dir(str(hf_dir), "tiny-llama", "auto")
    assert os.path.dirname(store) == str(cache) and os.path.basename(store).startswith(
        "tiny-llama-auto-"
    )
    layout = ModelLayout.load(store)
    assert layout.complete and layout.source["dir"] == str(hf_dir)
    stamp = os.stat(os.path.join(store, "model.json")).st_mtime_ns
    seen.clear()
    assert_same_logits(stream(hf_dir, progress=lambda *a: seen.append(a[2])), reference)
    assert seen == []  # the second load reads the store: nothing converted, nothing written
    assert os.stat(os.path.join(store, "model.json")).st_mtime_ns == stamp
    assert_same_logits(stream(store), reference)  # the store itself loads too
    assert os.listdir(cache) == [os.path.basename(store)]


def test_an_interrupted_first_use_resumes(hf_dir, reference, tmp_path):
    store, seen = tmp_path / "here", []

    def stop(done, total, unit):
        seen.append(unit)
        if unit == "model.layers.1":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stream(hf_dir, store_dir=store, progress=stop)
    with pytest.raises(ConfigError, match="incomplete"):
        ModelLayout.load(store)
    seen.clear()
    model = stream(hf_dir, store_dir=store, progress=lambda *a: seen.append(a[2]))
    assert seen == ["", "model.layers.2", "model.norm", "lm_head"]  # the rest only
    assert_same_logits(model, reference)


def test_dtype_and_explicit_store_dir(hf_dir, reference, cache, tmp_path):
    model = stream(hf_dir, dtype="bf16")
    model.infinity.close()
    store = default_store_dir(str(hf_dir), "tiny-llama", "bf16")
    assert ModelLayout.load(store).dtype == "bf16" and "-bf16-" in store
    with pytest.raises(ConfigError, match=r"converted with dtype 'bf16'; dtype='fp8' applies"):
        stream(store, dtype="fp8")
    with pytest.raises(ConfigError, match="dtype must be one of auto, fp32, bf16, fp16, fp8"):
        stream(hf_dir, dtype="int4")
    with pytest.raises(ConfigError, match="is a converted store already"):
        stream(store, store_dir=tmp_path / "elsewhere")
    other = tmp_path / "other"
    shutil.copytree(hf_dir, other)  # same files, another folder: its own store
    os.utime(other / "model.safetensors")
    assert default_store_dir(str(other), "other", "auto") != default_store_dir(
        str(hf_dir), "other", "auto"
    )
    with pytest.raises(ConfigError, match="holds a complete conversion of another checkpoint"):
        stream(other, dtype="bf16", store_dir=store)  # a store for another checkpoint: refused


def test_default_store_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("INFINITY_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_store_dir("/m/x", "org--x", "fp8").startswith(
        f"{tmp_path}/xdg/infinity/org--x-fp8-"
    )
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_store_dir("/m/x", "x", "auto").startswith(f"{tmp_path}/home/.cache/infinity/x-")
    monkeypatch.setenv("INFINITY_CACHE", str(tmp_path / "mine"))
    assert default_store_dir("/m/x", "a b/c", "auto").startswith(f"{tmp_path}/mine/a_b_c-auto-")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HUB_CACHE laid out as huggingface_hub writes it, HF_HUB_OFFLINE=1 (set in the
    environment, and in huggingface_hub.constants, which reads them once, at import)."""
    hub = tmp_path / "hub"
    for name, value in (("HF_HUB_CACHE", str(hub)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hub


def test_a_hub_id_is_taken_from_the_cache_offline(hf_dir, reference, cache, offline_hub):
    repo = offline_hub / "models--org--tiny-llama"
    (repo / "blobs").mkdir(parents=True)
    (snapshot := repo / "snapshots" / REVISION).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    for i, name in enumerate(sorted(os.listdir(hf_dir))):
        shutil.copyfile(hf_dir / name, repo / "blobs" / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snapshot / name)
    assert_same_logits(stream("org/tiny-llama"), reference)
    (store,) = os.listdir(cache)
    assert store.startswith("org--tiny-llama-auto-")
    assert ModelLayout.load(cache / store).source["dir"] == str(snapshot)
    with pytest.raises(ConfigError, match=r"Hub model org/absent .*HF_HUB_OFFLINE.*hf download"):
        stream("org/absent")
    with pytest.raises(ConfigError, match=r"nowhere/at/all does not exist"):
        stream("./nowhere/at/all")


def test_max_memory_is_the_budgets_in_accelerates_spelling():
    gpu0, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert _max_memory({0: "8GiB", "cpu": "60GiB"}, gpu0, None, None) == ("8GiB", "60GiB")
    assert _max_memory({"cuda:0": 5, 1: 7}, gpu0, None, None) == (5, None)
    assert _max_memory({0: "8GiB", "cpu": "60GiB"}, gpu0, 1, None) == (1, "60GiB")  # explicit wins
    assert _max_memory({"cpu": "1MiB"}, cpu, None, 0) == (None, 0)
    with pytest.raises(ConfigError, match=r"GPU \[1\], but load runs on cuda:0"):
        _max_memory({1: "8GiB"}, gpu0, None, None)
    with pytest.raises(ConfigError, match="GPU \\[0\\], but load runs on cpu"):
        _max_memory({0: "8GiB"}, cpu, None, None)
    with pytest.raises(ConfigError, match="key 'disk' is not understood"):
        _max_memory({"disk": "1TB"}, cpu, None, None)
    with pytest.raises(ConfigError, match="must be a dict"):
        _max_memory("8GiB", cpu, None, None)


def test_max_memory_cpu_is_the_pinned_tier(hf_dir, tmp_path):
    """A pinned budget holding the model: passes after the first read no disk."""
    kw = {"device": "cpu", "store_dir": tmp_path / "store", "aio": SMALL_AIO}
    probe = load(hf_dir, gpu_bytes=1 << 30, pinned_bytes=0, **kw)
    largest = max(u.nbytes for u in probe.infinity.units)  # as planned: aligned per key
    probe.infinity.close()
    for pinned, again in ((16 << 20, False), (0, True)):  # gpu_bytes: two layers stream
        model = load(hf_dir, max_memory={"cpu": pinned}, gpu_bytes=3 * largest, **kw)
        try:
            ids = torch.randint(3, 256, (1, 5))
            with torch.no_grad():
                model(ids)
                first = model.infinity.stats()["disk_bytes"]
                model(ids)
            assert (model.infinity.stats()["disk_bytes"] > first) == again
        finally:
            model.infinity.close()
