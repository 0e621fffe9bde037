"""`infinity store ls|fsck|compact` (issue 18): the folder `convert` wrote is taken for its store,
ls names its columns, ls and fsck print pure JSON with --json, fsck shows progress on a terminal
only."""

import json
import os
import shutil
import sys

import pytest
import torch
from store_helpers import small_config

from infinity.cli import run
from infinity.store import TieredStore

SHAPES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 256}


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run `infinity ARGS` in this process as the console script does: (exit status, stdout,
    stderr). Pure JSON on stdout with DeepSpeed imported is test_cli_json.py's (a child)."""

    def call(*args, env: dict | None = None) -> tuple[int, str, str]:
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(sys, "argv", ["infinity", *map(str, args)])
        with pytest.raises(SystemExit) as exited:
            run()
        out = capsys.readouterr()
        return exited.value.code, out.out, out.err

    return call


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    """A tiny random Llama converted by `infinity convert` (its store in STORE_DIR/data)."""
    import transformers

    from infinity.inference import convert

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SHAPES, num_attention_heads=4, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float16)
    base = tmp_path_factory.mktemp("converted")
    model.save_pretrained(base / "hf")
    convert(base / "hf", base / "model")
    return str(base / "model")


@pytest.fixture
def store_path(disk_dir) -> str:
    path = os.path.join(disk_dir, "store")
    with TieredStore.open(path, small_config()) as s:
        s.put("weight", torch.arange(1000, dtype=torch.float32))
        s.put("bias", torch.ones(10, dtype=torch.bfloat16))
        s.put("bias", torch.zeros(10, dtype=torch.bfloat16))  # written twice: version 2
    return path


def test_ls_names_its_columns(store_path, cli):
    code, out, err = cli("store", "ls", store_path)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["key", "dtype", "shape", "size", "version"], out
    assert lines[1].split() == ["bias", "bfloat16", "[10]", "20", "B", "2"], out
    assert lines[2].split() == ["weight", "float32", "[1000]", "3.91", "KiB", "1"], out
    assert lines[3].startswith("2 keys, ") and len(lines) == 4, out
    # the columns line up: each header starts where its values start
    assert lines[0].index("dtype") == lines[1].index("bfloat16") == lines[2].index("float32")
    assert len(lines[0]) == len(lines[1]) == len(lines[2])  # size, version right-aligned


def test_ls_and_fsck_json(store_path, cli):
    code, out, err = cli("store", "ls", "--json", store_path)
    assert code == 0, err
    doc = json.loads(out)  # the whole of stdout
    assert doc["store"] == [store_path] and doc["damaged"] == {}
    assert doc["keys"] == [
        {"key": "bias", "dtype": "bfloat16", "shape": [10], "nbytes": 20, "version": 2},
        {"key": "weight", "dtype": "float32", "shape": [1000], "nbytes": 4000, "version": 1},
    ]
    code, out, err = cli("store", "fsck", "--json", store_path)
    assert code == 0, err
    assert json.loads(out) == {"store": [store_path], "keys": 2, "intact": 2, "damaged": {}}


def test_fsck_json_of_a_damaged_key_exits_1(store_path, cli):
    with TieredStore.open(store_path, small_config(), readonly=True) as s:
        first = s._entries["weight"].extents[0]
        data = s._files[first.file]
    with open(data, "r+b") as f:
        f.seek(first.file_offset + 100)
        byte = f.read(1)
        f.seek(first.file_offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    code, out, err = cli("store", "fsck", "--json", store_path)
    doc = json.loads(out)
    assert code == 1 and doc["intact"] == 1 and list(doc["damaged"]) == ["weight"]
    assert "checksum" in doc["damaged"]["weight"], doc


@pytest.mark.parametrize("how", ["piped", "terminal", "terminal --json"])
def test_fsck_progress_on_a_terminal_only(store_path, cli, how):
    """rich draws a bar on a terminal (TTY_COMPATIBLE=1 makes it take the pipe for one)."""
    env = {"TTY_COMPATIBLE": "1"} if how.startswith("terminal") else {"TTY_COMPATIBLE": "0"}
    code, out, err = cli(
        "store", "fsck", store_path, *(["--json"] if "json" in how else []), env=env
    )
    assert code == 0, err
    drawn = "fsck" in err and "3.9/3.9 KiB" in err  # 4000 + 20 bytes read
    assert drawn == (how == "terminal"), err
    if "json" in how:
        json.loads(out)
    else:
        assert out == "2 of 2 keys intact\n"


def test_fsck_reports_progress_in_bytes(store_path):
    seen = []
    with TieredStore.open(store_path, small_config(), readonly=True) as s:
        assert s.fsck(lambda done, total: seen.append((done, total))) == {}
    assert seen == [(20, 4020), (4020, 4020)]  # after each key, in keys() order


@pytest.mark.parametrize("command", ["ls", "fsck", "compact"])
def test_store_commands_take_the_folder_convert_wrote(cli, converted, tmp_path, command):
    model = tmp_path / "model"
    shutil.copytree(converted, model)  # compact writes
    data = str(model / "data")
    code, out, err = cli("store", command, model)
    assert code == 0, err
    assert f"{model} is a converted model folder; its store is {data}" in err
    expect = {"ls": "21 keys, ", "fsck": "21 of 21 keys intact", "compact": "released "}[command]
    assert expect in out, out
    if command == "ls":
        assert "model.layers.1.mlp.up_proj.weight" in out
        assert cli("store", command, data)[1] == out  # the same store


def test_a_converted_folder_with_its_store_elsewhere(cli, converted, tmp_path):
    from infinity.inference import convert

    model, data = tmp_path / "model", tmp_path / "elsewhere"
    hf = os.path.join(os.path.dirname(converted), "hf")
    convert(hf, model, nvme_paths=[data])
    code, out, err = cli("store", "ls", "--json", model)
    assert code == 0, err
    assert json.loads(out)["store"] == [str(data)]
    assert f"its store is {data}" in err


def test_a_damaged_model_json_is_one_line(cli, converted, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(converted, model)
    (model / "model.json").write_text("{}")
    code, out, err = cli("store", "ls", model)
    assert code == 2 and out == "" and err.startswith("error: "), err
    assert "is not an infinity model layout" in err and len(err.splitlines()) == 1, err
