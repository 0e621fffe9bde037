"""Bad input through the real entry point (``infinity.cli.run``): FIFOs, devices, huge or
malformed configs, absurd model shapes. Each must end within seconds with exit status 2 and a
one-line message naming the file, never hang and never print a traceback."""

import contextlib
import json
import os
import re
import signal
import sys

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
