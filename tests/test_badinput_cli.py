"""Bad input through the real entry point (``infinity.cli.run``): FIFOs, devices, huge or
malformed configs, absurd model shapes. Each must end within seconds with exit status 2 and a
one-line message naming the file, never hang and never print a traceback."""

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import sys
import tempfile

import pytest
from safetensors.torch import save_file

from infinity.cli import run
from infinity.files import MAX_CONFIG_BYTES

SHAPES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 256}
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_attention_heads": 4}
LLAMA |= SHAPES


class Hang(Exception):
    """Not an OSError (as TimeoutError is), so that no `except OSError` can swallow it."""


@contextlib.contextmanager
def deadline(seconds: int):
    """Hang instead of hanging (SIGALRM interrupts a blocking open or a long build)."""

    def expire(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run `infinity ARGS` as the console script does; (exit status, stdout + stderr)."""
    monkeypatch.setattr(sys, "argv", ["infinity", *map(str, args)])
    with deadline(20), pytest.raises(SystemExit) as exited:
        run()
    out = capsys.readouterr()
    return exited.value.code, out.out + out.err


def special(tmp_path, kind: str) -> str:
    """A path that is not a regular file of sane size."""
    if kind == "fifo":
        os.mkfifo(path := tmp_path / "fifo.json")  # no writer: open() blocks forever
    elif kind == "dev-zero":
        path = "/dev/zero"  # never ends
    else:
        with open(path := tmp_path / "big.json", "wb") as f:
            f.truncate(MAX_CONFIG_BYTES + 1)
    return str(path)


EXPECT = {
    "fifo": "is a FIFO (named pipe), not a regular file",
    "dev-zero": "is a character device, not a regular file",
    "big": "is over 67,108,864 bytes (64 MiB)",
}


@pytest.mark.parametrize("kind", list(EXPECT))
@pytest.mark.parametrize("command", ["lint", "lint --model", "estimate --model"])
def test_non_regular_or_huge_files_are_refused_at_once(monkeypatch, capsys, tmp_path, kind,
                                                       command):  # fmt: skip
    path = special(tmp_path, kind)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    args = {"lint": ["lint", path], "lint --model": ["lint", ds, "--model", path]}
    code, out = cli(monkeypatch, capsys, *args.get(command, ["estimate", "--model", path]))
    assert code == 2 and "error: " in out and EXPECT[kind] in out and path in out, out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "is empty"),
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
        ('{"train_batch_size": %s}' % ("1" * 5000), "holds a number Python cannot read"),
        ('{"zero_optimization": {"stage": 2, "reduce_bucket_size": 1e999999}}', "cannot read"),
        (b"\x00\x01binary\xff", "is not UTF-8 text"),
    ],
    ids=["empty", "deep", "5000-digits", "1e999999", "binary"],
)
def test_lint_of_malformed_files_is_one_line(monkeypatch, capsys, tmp_path, text, message):
    path = tmp_path / "ds.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, out = cli(monkeypatch, capsys, "lint", path)
    assert code == 2 and out.startswith("error: ") and message in out, out
    assert len(out.strip().splitlines()) == 1, out


@pytest.mark.parametrize(
    "zero, path",
    [
        ({"stage": 99}, "zero_optimization.stage"),
        ({"stage": 2, "reduce_bucket_size": -5}, "zero_optimization.reduce_bucket_size"),
        ({"stage": 2, "allgather_bucket_size": -1}, "zero_optimization.allgather_bucket_size"),
    ],
)
def test_lint_out_of_range_values_are_errors(monkeypatch, capsys, tmp_path, zero, path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"overlap_comm": True, **zero}}))
    code, out = cli(monkeypatch, capsys, "lint", config)
    assert code == 2 and f"error: {path}: " in out and "fix: " in out, out


@pytest.mark.parametrize("params", ["nan", "inf", "1e400", "-inf", "1e16"])
def test_estimate_params_must_be_a_sane_count(monkeypatch, capsys, params):
    code, out = cli(monkeypatch, capsys, "estimate", "--params", params)
    assert code == 2 and "Traceback" not in out and "GB" not in out, out
    assert re.search(r"not a positive whole number|whole number from 1 to 1e\+15", out), out


def test_estimate_negative_hidden_size(monkeypatch, capsys, tmp_path):
    model = tmp_path / "config.json"
    model.write_text(json.dumps({**LLAMA, "hidden_size": -64}))
    code, out = cli(monkeypatch, capsys, "estimate", "--model", model)
    assert code == 2 and "hidden_size = -64 is not a whole number from 1" in out, out
    assert out.startswith("error: ") and len(out.strip().splitlines()) == 1, out  # no table


def checkpoint_dir(tmp_path, config: dict | None = None) -> str:
    """config.json and an empty model.safetensors: enough to reach the config checks."""
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    if config is None:
        os.mkfifo(hf_dir / "config.json")
    else:
        (hf_dir / "config.json").write_text(json.dumps(config))
    save_file({}, str(hf_dir / "model.safetensors"))
    return str(hf_dir)


@pytest.mark.parametrize(
    "config, message",
    [
        (None, "config.json is a FIFO (named pipe), not a regular file"),
        ({**LLAMA, "num_hidden_layers": 10**9}, "num_hidden_layers = 1000000000 is not a whole"),
        ({**LLAMA, "num_hidden_layers": 1e5}, "num_hidden_layers = 100000.0 is not a whole"),
    ],
    ids=["fifo-config", "1e9-layers", "1e5-layers-float"],
)
def test_convert_refuses_bad_configs_at_once(monkeypatch, capsys, tmp_path, config, message):
    hf_dir = checkpoint_dir(tmp_path, config)
    code, out = cli(monkeypatch, capsys, "convert", hf_dir, tmp_path / "store")
    assert code == 2 and message in out and "Traceback" not in out, out
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("where", ["same", "inside", "outside"])
def test_convert_into_its_own_checkpoint(monkeypatch, capsys, tmp_path, where):
    hf_dir = checkpoint_dir(tmp_path, LLAMA)
    store = {"same": hf_dir, "inside": f"{hf_dir}/store", "outside": str(tmp_path)}[where]
    code, out = cli(monkeypatch, capsys, "convert", hf_dir, store)
    assert code == 2 and "overlap (the same directory, or one inside the other)" in out, out
    assert sorted(os.listdir(hf_dir)) == ["config.json", "model.safetensors"]


# -- convert: malformed safetensors, bad indexes, bad destinations --------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """A real single-file checkpoint (tiny random Llama in fp16, no tokenizer)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SHAPES, num_attention_heads=4, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float16)
    path = tmp_path_factory.mktemp("tiny") / "hf"
    model.save_pretrained(path)
    return str(path)


def copy_of(tiny: str, tmp_path) -> str:
    shutil.copytree(tiny, hf := tmp_path / "hf")
    return str(hf)


def split(raw: bytes) -> tuple[dict, bytes]:
    """(header, data) of a safetensors file's bytes."""
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def joined(header, data: bytes, text: str | None = None) -> bytes:
    body = (json.dumps(header) if text is None else text).encode()
    return len(body).to_bytes(8, "little") + body + data


def entries(header: dict) -> list[str]:
    """The tensor names in file order."""
    names = [k for k in header if k != "__metadata__"]
    return sorted(names, key=lambda k: header[k]["data_offsets"])


def with_entry(raw: bytes, change) -> bytes:
    header, data = split(raw)
    change(header, entries(header))
    return joined(header, data)


def _overlap(header, names):  # the second of two tensors of one size at the first's bytes
    sizes = [(header[n]["data_offsets"][1] - header[n]["data_offsets"][0], n) for n in names]
    first, second = next((a, b) for a, b in itertools.combinations(sizes, 2) if a[0] == b[0])
    header[second[1]]["data_offsets"] = list(header[first[1]]["data_offsets"])


def _duplicate(raw: bytes) -> bytes:
    header, data = split(raw)
    name = entries(header)[0]
    text = json.dumps(header)
    return joined(None, data, "{" + f"{json.dumps(name)}: {json.dumps(header[name])}, " + text[1:])


MALFORMED = {  # name -> (mutate the file's bytes, what the message says)
    "length-2^63": (lambda r: (2**63).to_bytes(8, "little") + r[8:], "9,223,372,036,854,775,808"),
    "length-0": (lambda r: bytes(8) + r[8:], "header length is 0 bytes"),
    "length-past-eof": (lambda r: len(r).to_bytes(8, "little") + r[8:], "bytes follow it in"),
    "not-json": (
        lambda r: r[:8] + b"{" + b"x" * (len(json.dumps(split(r)[0])) - 1) + split(r)[1],
        "its header is not JSON",
    ),  # fmt: skip
    "not-an-object": (
        lambda r: r[:8] + b"x" * len(json.dumps(split(r)[0])) + split(r)[1],
        "its header starts with xxxxxxxx, not {",
    ),  # fmt: skip
    "nan": (lambda r: joined(None, split(r)[1], '{"a": NaN}'), "NaN is not JSON"),
    "surrogate": (lambda r: joined(None, split(r)[1], '{"\\ud800": 1}'), "lone surrogate"),
    "metadata": (
        lambda r: joined(split(r)[0] | {"__metadata__": {"a": 1}}, split(r)[1]),
        "its __metadata__ {'a': 1} is not an object of strings",
    ),  # fmt: skip
    "not-utf8": (
        lambda r: r[:8] + b"\xff" * len(json.dumps(split(r)[0])) + split(r)[1],
        "not UTF-8 text (byte 0xff at offset 8)",
    ),  # fmt: skip
    "header-a-list": (lambda r: joined([1, 2], split(r)[1]), "header starts with [1, 2], not {"),
    "offsets-past-eof": (
        lambda r: with_entry(
            r,
            lambda h, n: h[n[-1]].update(data_offsets=[o + 4096 for o in h[n[-1]]["data_offsets"]]),
        ),
        "past the end of the data",
    ),  # fmt: skip
    "overlap": (lambda r: with_entry(r, _overlap), ") overlap"),
    "dtype-lies": (
        lambda r: with_entry(r, lambda h, n: h[n[0]].update(dtype="F32")),
        "is F32 of shape",
    ),  # fmt: skip
    "shape-lies": (
        lambda r: with_entry(r, lambda h, n: h[n[0]].update(shape=[2 * h[n[0]]["shape"][0], 64])),
        "but its data_offsets",
    ),
    "negative-shape": (
        lambda r: with_entry(r, lambda h, n: h[n[0]].update(shape=[-1, 64])),
        "not a list of whole numbers",
    ),  # fmt: skip
    "hole": (lambda r: with_entry(r, lambda h, n: h.pop(n[1])), "belong to no tensor"),
    "trailing-bytes": (lambda r: r + bytes(16), "nothing after the last tensor"),
    "duplicate-key": (_duplicate, "twice"),
    "truncated": (lambda r: r[: len(r) - 1000], "past the end of the data"),
    "cut-in-header": (lambda r: r[:40], "bytes follow it in the file"),
    "7-bytes": (lambda r: r[:7], "is 7 bytes long"),
    "empty": (lambda r: b"", "(the file is empty)"),
    "unsupported-dtype": (
        lambda r: with_entry(r, lambda h, n: h[n[0]].update(dtype="C64")),
        "has dtype 'C64', which infinity does not convert",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_convert_refuses_malformed_safetensors(monkeypatch, capsys, tmp_path, tiny, case):
    hf_dir = copy_of(tiny, tmp_path)
    shard = os.path.join(hf_dir, "model.safetensors")
    mutate, message = MALFORMED[case]
    with open(shard, "rb") as f:
        raw = f.read()
    with open(shard, "wb") as f:
        f.write(mutate(raw))
    code, out = cli(monkeypatch, capsys, "convert", hf_dir, tmp_path / "store")
    assert code == 2 and out.startswith("error: ") and len(out.strip().splitlines()) == 1, out
    assert shard in out and message in out, out
    kind = "which infinity does not convert" if case == "unsupported-dtype" else "not a valid"
    assert kind in out, out
    assert not (tmp_path / "store").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "index, message",
    [
        ({"weight_map": {"lm_head.weight": "config.json"}}, "to config.json, which is not a .saf"),
        ({"weight_map": {"lm_head.weight": "pytorch_model.bin"}}, "PyTorch pickle weights"),
        ({"weight_map": {"lm_head.weight": "model-2.safetensors"}}, "download is incomplete"),
        ({"weight_map": {"lm_head.weight": "../hf/model.safetensors"}}, "which is not a file name"),
        ({"weight_map": {"lm_head.weight": "/etc/passwd"}}, "which is not a file name"),
        ({"weight_map": {"lm_head.weight": 7}}, "maps 'lm_head.weight' to 7, not a file name"),
        ({"weight_map": {}}, 'needs a non-empty "weight_map" object'),
        (["model.safetensors"], 'needs a non-empty "weight_map" object'),
    ],
    ids=["config.json", "bin", "missing", "dotdot", "absolute", "number", "empty", "list"],
)
def test_convert_refuses_bad_indexes(monkeypatch, capsys, tmp_path, tiny, index, message):
    hf_dir = copy_of(tiny, tmp_path)
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    code, out = cli(monkeypatch, capsys, "convert", hf_dir, tmp_path / "store")
    assert code == 2 and out.startswith("error: ") and len(out.strip().splitlines()) == 1, out
    assert "model.safetensors.index.json" in out and message in out, out
    assert not (tmp_path / "store").exists()


def memory_dir() -> str:
    from infinity.io.fsinfo import mount_of

    if mount_of("/dev/shm")[1] != "tmpfs":
        pytest.skip("/dev/shm is not tmpfs here")
    return tempfile.mkdtemp(prefix="infinity-test-", dir="/dev/shm")


@pytest.mark.parametrize("where", ["store-dir", "nvme-path"])
def test_convert_to_tmpfs_writes_nothing(monkeypatch, capsys, tmp_path, tiny, where):
    monkeypatch.delenv("INFINITY_ALLOW_TMPFS", raising=False)
    shm = memory_dir()
    try:
        store = os.path.join(shm, "store") if where == "store-dir" else str(tmp_path / "store")
        extra = ["--nvme-path", os.path.join(shm, "data")] if where == "nvme-path" else []
        code, out = cli(monkeypatch, capsys, "convert", tiny, store, *extra)
        assert code == 2 and len(out.strip().splitlines()) == 1, out
        assert "is on tmpfs (mounted at /dev/shm): memory, not a disk" in out, out
        assert "INFINITY_ALLOW_TMPFS=1" in out and os.listdir(shm) == [], out
        assert not os.path.exists(store)  # no model.json, configs or data/ left behind
    finally:
        shutil.rmtree(shm)


@pytest.mark.parametrize("how", ["same", "alias", "no-parent"])
def test_convert_refuses_store_paths_before_writing(monkeypatch, capsys, tmp_path, tiny, how):
    (a := tmp_path / "a").mkdir()
    os.symlink(a, tmp_path / "alias")
    second = {"same": a, "alias": tmp_path / "alias", "no-parent": tmp_path / "x" / "y"}[how]
    args = ["convert", tiny, tmp_path / "store", "--nvme-path", a, "--nvme-path", second]
    code, out = cli(monkeypatch, capsys, *args)
    message = {
        "same": f"store path {a} is given twice: each --nvme-path is its own directory",
        "alias": f"is given twice ({a} and {second} are one directory)",
        "no-parent": f"its parent {tmp_path / 'x'} does not exist",
    }[how]
    assert code == 2 and message in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "store").exists() and os.listdir(a) == []


# -- store commands and generate on what is not a store -------------------------------------------
@pytest.mark.parametrize("command", ["ls", "fsck", "compact"])
@pytest.mark.parametrize("kind", ["empty-dir", "file", "fifo", "missing"])
def test_store_commands_on_what_is_not_a_store(monkeypatch, capsys, tmp_path, command, kind):
    path = tmp_path / "thing"
    {"empty-dir": os.mkdir, "file": lambda p: p.write_text("x"), "fifo": os.mkfifo}.get(
        kind, lambda p: None
    )(path)
    code, out = cli(monkeypatch, capsys, "store", command, path)
    assert code == 2 and "Traceback" not in out, out
    last = out.strip().splitlines()[-1]
    if kind == "empty-dir":
        assert out.startswith("error: no infinity store at ") and len(out.splitlines()) == 1, out
        assert os.listdir(path) == []  # compact did not make a store there
    else:  # click's usage error: the usage, then one line saying what is wrong
        expect = {"file": "is a file", "fifo": "is a FIFO (named pipe), not a directory",
                  "missing": "does not exist"}[kind]  # fmt: skip
        assert last.startswith("Error: Invalid value for 'PATHS...'") and expect in last, out


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "--dir", "{fifo}"], "'--dir': '{fifo}' is a FIFO (named pipe), not a directory"),
        (["bench", "io", "--dir", "{tmp}", "-o", "{tmp}/no/x.json"], "does not exist"),
        (["bench", "io", "--dir", "{tmp}", "--output", "{fifo}"], "is not a regular file"),
    ],
    ids=["info-dir-fifo", "bench-output-no-dir", "bench-output-fifo"],
)
def test_cli_paths_checked_before_running(monkeypatch, capsys, tmp_path, args, message):
    os.mkfifo(fifo := tmp_path / "fifo")
    fill = {"fifo": fifo, "tmp": tmp_path}
    code, out = cli(monkeypatch, capsys, *(a.format(**fill) for a in args))
    assert code == 2 and "Traceback" not in out, out
    assert message.format(**fill) in out.strip().splitlines()[-1], out


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny) -> str:
    from infinity.inference import convert

    store = tmp_path_factory.mktemp("converted") / "store"
    convert(tiny, store)
    return str(store)


def generate_in(monkeypatch, capsys, store, prompt="hello") -> tuple[int, str]:
    return cli(monkeypatch, capsys, "generate", store, "--prompt", prompt, "--device", "cpu")


def test_generate_on_what_is_not_a_converted_model(monkeypatch, capsys, tmp_path, converted):
    (empty := tmp_path / "empty").mkdir()
    code, out = generate_in(monkeypatch, capsys, empty)
    assert code == 2 and len(out.strip().splitlines()) == 1, out
    assert f"{empty} has no model.json" in out and "run `infinity convert HF_DIR" in out, out
    code, out = generate_in(monkeypatch, capsys, converted, "")
    assert code == 2 and out.strip() == "error: the prompt is '': give some text to continue " \
        "(--prompt TEXT)", out  # fmt: skip
    code, out = generate_in(monkeypatch, capsys, converted)
    assert code == 2 and len(out.strip().splitlines()) == 1, out
    assert (
        f"{converted} has no tokenizer: none of tokenizer.json, tokenizer.model, vocab.json" in out
    )


@pytest.mark.parametrize("how", ["incomplete", "fifo", "link", "tokenizer-fifo"])
def test_generate_on_a_damaged_store_dir(monkeypatch, capsys, tmp_path, converted, how):
    store = tmp_path / "store"
    shutil.copytree(converted, store)
    layout = store / "model.json"
    source = json.loads(layout.read_text())["source"]["dir"]
    if how == "incomplete":
        layout.write_text(json.dumps(json.loads(layout.read_text()) | {"complete": False}))
    elif how == "fifo":
        layout.unlink()
        os.mkfifo(layout)
    elif how == "link":
        os.replace(layout, tmp_path / "elsewhere.json")
        os.symlink(tmp_path / "elsewhere.json", layout)
    else:
        (store / "tokenizer_config.json").write_text("{}")
        os.mkfifo(store / "tokenizer.json")
    code, out = generate_in(monkeypatch, capsys, store)
    message = {
        "incomplete": f"the conversion in {store} is incomplete (interrupted, or it failed): "
        f"run `infinity convert {source} {store} --dtype auto` again to finish it",
        "fifo": f"model.json {layout} is a FIFO (named pipe), not a regular file",
        "link": f"model.json {layout} is a symbolic link",
        "tokenizer-fifo": f"tokenizer.json {store / 'tokenizer.json'} is a FIFO (named pipe)",
    }[how]
    assert code == 2 and message in out and len(out.strip().splitlines()) == 1, out


@pytest.mark.parametrize("how", ["never-converted", "model.json-fifo", "config.json-fifo"])
def test_load_of_what_is_not_a_usable_store(tmp_path, converted, how):
    """infinity.inference.load says what to do, at once, instead of a traceback or a hang."""
    from infinity.errors import ConfigError
    from infinity.inference import load

    store = tmp_path / "store"
    if how == "never-converted":
        store.mkdir()
    else:
        shutil.copytree(converted, store)
        name = how.removesuffix("-fifo")
        (store / name).unlink()
        os.mkfifo(store / name)
    message = {
        "never-converted": f"{store} has no model.json: it is not a converted model (or its "
        f"conversion never started); run `infinity convert HF_DIR {store}` first",
        "model.json-fifo": "model.json",
        "config.json-fifo": "config.json",
    }[how]
    with deadline(20), pytest.raises(ConfigError) as refused:
        load(store, device="cpu")
    assert message in str(refused.value), refused.value
    if how != "never-converted":
        assert "is a FIFO (named pipe), not a regular file" in str(refused.value)
