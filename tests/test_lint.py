"""infinity.lint: a table of DeepSpeed configs with the findings each must and must not produce."""

import json
import re

import pytest
from click.testing import CliRunner

import infinity.lint as lint_mod
from infinity.cli import main
from infinity.errors import ConfigError
from infinity.estimate import ModelSpec
from infinity.lint import exit_code, lint

SMALL = ModelSpec.from_params(350e6)
LLAMA2_7B = ModelSpec.from_hf_config(
    {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "intermediate_size": 11008,
        "vocab_size": 32000,
        "num_attention_heads": 32,
    }
)
GOOD_AIO = {"block_size": 1048576, "queue_depth": 32, "intra_op_parallelism": 8}


def zero3(**kw):
    return {"train_batch_size": 8, "zero_optimization": {"stage": 3, **kw}}


def nvme(path="{disk}", **kw):
    return {"device": "nvme", "nvme_path": path, "pin_memory": True, **kw}


# (id, config, model, findings that must appear as (level, path), paths that must not appear)
CASES = [
    (
        "clean-zero2",
        {
            "train_micro_batch_size_per_gpu": 4,
            "bf16": {"enabled": True},
            "zero_optimization": {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 5e8},
        },
        LLAMA2_7B,
        set(),
        None,  # None: nothing at all
    ),
    (
        "zero3-with-activation-checkpointing-is-fine",
        {**zero3(), "activation_checkpointing": {"partition_activations": True}},
        LLAMA2_7B,
        set(),
        None,
    ),
    (
        "hf-auto-values-are-not-numbers",
        zero3(reduce_bucket_size="auto", stage3_prefetch_bucket_size="auto"),
        LLAMA2_7B,
        set(),
        None,
    ),
    (
        "pin-memory-false",
        zero3(
            offload_param={"device": "cpu", "pin_memory": False},
            offload_optimizer={"device": "cpu", "pin_memory": True},
        ),
        None,
        {("warning", "zero_optimization.offload_param.pin_memory")},
        {"zero_optimization.offload_optimizer.pin_memory"},
    ),
    (
        "overlap-comm-false",
        {"zero_optimization": {"stage": 2, "overlap_comm": False}},
        None,
        {("warning", "zero_optimization.overlap_comm")},
        set(),
    ),
    (
        "overlap-comm-left-out-is-not-flagged",
        {"zero_optimization": {"stage": 2}},
        None,
        set(),
        {"zero_optimization.overlap_comm"},
    ),
    (
        "huge-buckets",
        zero3(reduce_bucket_size=2e9, allgather_bucket_size=1e9, stage3_prefetch_bucket_size=3e9),
        None,
        {
            ("warning", "zero_optimization.reduce_bucket_size"),
            ("warning", "zero_optimization.stage3_prefetch_bucket_size"),
        },
        {"zero_optimization.allgather_bucket_size"},  # 1e9 is the threshold, not above it
    ),
    (
        "zero3-small-model",
        zero3(),
        SMALL,
        {("warning", "zero_optimization.stage")},
        set(),
    ),
    (
        "zero3-small-model-unknown-size",
        zero3(),
        None,
        set(),
        {"zero_optimization.stage"},
    ),
    (
        "zero3-large-model",
        zero3(),
        LLAMA2_7B,
        set(),
        {"zero_optimization.stage"},
    ),
    (
        "nvme-without-aio",
        zero3(offload_optimizer=nvme()),
        None,
        {("warning", "aio")},
        {"zero_optimization.offload_optimizer.nvme_path"},
    ),
    (
        "nvme-with-aio-thread-count",
        {**zero3(offload_optimizer=nvme()), "aio": {**GOOD_AIO, "thread_count": 8}},
        None,
        {("warning", "aio.thread_count")},
        {"aio"},
    ),
    (
        "buffer-size-too-small",
        {**zero3(offload_param=nvme(buffer_size=1e8)), "aio": GOOD_AIO},
        LLAMA2_7B,  # embeddings: 32000 x 4096 = 1.31e8 elements
        {("error", "zero_optimization.offload_param.buffer_size")},
        set(),
    ),
    (
        "buffer-size-large-enough",
        {**zero3(offload_param=nvme(buffer_size=2e8)), "aio": GOOD_AIO},
        LLAMA2_7B,
        set(),
        None,
    ),
    (
        "nvme-path-on-tmpfs",
        {**zero3(offload_param=nvme("{ram}")), "aio": GOOD_AIO},
        None,
        {("error", "zero_optimization.offload_param.nvme_path")},
        set(),
    ),
    (
        "nvme-path-missing",
        {**zero3(offload_optimizer=nvme("{missing}")), "aio": GOOD_AIO},
        None,
        {("error", "zero_optimization.offload_optimizer.nvme_path")},
        set(),
    ),
    (
        "nvme-with-zero2",
        {"zero_optimization": {"stage": 2, "offload_optimizer": nvme()}, "aio": GOOD_AIO},
        None,
        {("error", "zero_optimization.offload_optimizer.device")},
        set(),
    ),
    (
        "typos-anywhere",
        {
            "zero_optimisation": {"stage": 3},
            "zero_optimization": {
                "stage": 3,
                "stage3_prefetch_bucket_siz": 5e7,
                "offload_param": {"device": "cpu", "pin_memroy": True},
            },
            "fp16": {"enabeld": True},
            "aio": {"block_sise": 1048576},
        },
        None,
        {
            ("error", "zero_optimisation"),
            ("error", "zero_optimization.stage3_prefetch_bucket_siz"),
            ("error", "zero_optimization.offload_param.pin_memroy"),
            ("error", "fp16.enabeld"),
            ("error", "aio.block_sise"),
        },
        {"zero_optimization.stage"},
    ),
    (
        "aliases-and-free-form-sections-are-known",
        {
            **zero3(stage3_max_live_parameters=1e9, prefetch_bucket_size=5e7),
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "anything": 1}},
            "gradient_clipping": 1.0,
        },
        None,
        set(),
        None,
    ),
    (
        "deprecated-cpu-offload",
        {"zero_optimization": {"stage": 2, "cpu_offload": True}},
        None,
        {("warning", "zero_optimization.cpu_offload")},
        set(),
    ),
    (
        "stage-99-is-not-a-stage",
        {"zero_optimization": {"stage": 99}},
        None,
        {("error", "zero_optimization.stage")},
        set(),
    ),
    (
        "stage-as-deepspeed-coerces-it-is-fine",  # DeepSpeed reads "3" and 3.0 as stage 3
        {"zero_optimization": {"stage": "3", "overlap_comm": True}},
        None,
        set(),
        None,
    ),
    (
        "negative-and-zero-sizes",
        zero3(
            reduce_bucket_size=0,  # DeepSpeed: > 0
            allgather_bucket_size=-5e8,
            stage3_prefetch_bucket_size=-1,  # an alias of prefetch_bucket_size
            sub_group_size=-1,
            offload_param=nvme(buffer_size=-1, buffer_count=-4),
        )
        | {"aio": {**GOOD_AIO, "block_size": -1, "queue_depth": 0}},
        None,
        {
            ("error", f"zero_optimization.{k}")
            for k in (
                "reduce_bucket_size",
                "allgather_bucket_size",
                "stage3_prefetch_bucket_size",
                "sub_group_size",
                "offload_param.buffer_size",
                "offload_param.buffer_count",
            )
        }
        | {("error", "aio.block_size"), ("error", "aio.queue_depth")},
        {"aio.intra_op_parallelism"},
    ),
]


@pytest.fixture
def places(tmp_path, monkeypatch):
    disk, ram = tmp_path / "disk", tmp_path / "ram"
    disk.mkdir()
    ram.mkdir()

    def fake_mount_of(path):
        return ("/mnt/ram", "tmpfs", "tmpfs") if "ram" in str(path) else ("/", "ext4", "nvme0n1")

    monkeypatch.setattr(lint_mod, "mount_of", fake_mount_of)
    return {"disk": str(disk), "ram": str(ram), "missing": str(tmp_path / "nope")}


def fill(config, places):
    return json.loads(
        json.dumps(config)
        .replace("{disk}", places["disk"])
        .replace("{ram}", places["ram"])
        .replace("{missing}", places["missing"])
    )


@pytest.mark.parametrize(
    "config, model, must, must_not", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_findings(config, model, must, must_not, places):
    findings = lint(fill(config, places), model)
    got = {(f.level, f.path) for f in findings}
    assert must <= got, f"missing {must - got}; got {findings}"
    if must_not is None:
        assert findings == [], findings
    else:
        assert not {f.path for f in findings} & must_not, findings
    for f in findings:
        assert f.message and f.fix


def test_typo_suggests_the_closest_key():
    (f,) = lint({"zero_optimization": {"stage": 2, "reduce_bucket_sise": 5e8}})
    assert f.level == "error" and "reduce_bucket_size" in f.fix


def test_pin_memory_left_out_follows_installed_deepspeed(monkeypatch):
    config = zero3(offload_optimizer={"device": "cpu"})
    monkeypatch.setattr(lint_mod, "_installed_pin_default", lambda: False)
    assert [f.path for f in lint(config)] == ["zero_optimization.offload_optimizer.pin_memory"]
    monkeypatch.setattr(lint_mod, "_installed_pin_default", lambda: True)
    assert lint(config) == []


def test_exit_code():
    warn = lint_mod.Finding("warning", "a", "m", "f")
    err = lint_mod.Finding("error", "b", "m", "f")
    assert (exit_code([]), exit_code([warn]), exit_code([warn, err])) == (0, 1, 2)


def test_hjson_and_unreadable(tmp_path):
    path = tmp_path / "ds.hjson"
    path.write_text("{\n  # comment\n  zero_optimization: {stage: 2, overlap_comm: false}\n}\n")
    assert [f.path for f in lint(path)] == ["zero_optimization.overlap_comm"]
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="object"):
        lint(bad)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "is empty"),
        (" \n", "is empty"),
        ("1e999999", "neither JSON nor HJSON"),
        ('{"train_batch_size": 1e999999}', "cannot read"),
        ("1" * 5000, "neither JSON nor HJSON"),
        ('{"train_batch_size": %s}' % ("1" * 5000), "cannot read"),
        ('{"train_batch_size": %s}' % ("1" * 30), "30 digits, beyond 64 bits"),
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
        ('{"a": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
        (b"\x7fELF\x02\x01\x01\x00\xff\xfe", "not UTF-8 text (byte 0xff at offset 8)"),
    ],
    ids=[
        "empty",
        "blank",
        "inf",
        "inf-value",
        "digits",
        "digits-value",
        "int-over-64-bits",
        "deep",
        "deep-value",
        "binary",
    ],  # fmt: skip
)
def test_unreadable_configs_are_one_config_error(tmp_path, text, message):
    path = tmp_path / "ds.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        lint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_non_finite_number_in_a_dict_is_refused():
    with pytest.raises(ConfigError, match="reduce_bucket_size is inf, not a finite number"):
        lint({"zero_optimization": {"stage": 2, "reduce_bucket_size": float("inf")}})


@pytest.mark.parametrize(
    "config, code",
    [
        ({"zero_optimization": {"stage": 2, "overlap_comm": True}}, 0),
        ({"zero_optimization": {"stage": 2, "overlap_comm": False}}, 1),
        ({"zero_optimisation": {"stage": 2}}, 2),
    ],
)
def test_cli_exit_status_and_json(tmp_path, config, code):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    runner = CliRunner()
    res = runner.invoke(main, ["lint", str(path)])
    assert res.exit_code == code, res.output
    res = runner.invoke(main, ["lint", str(path), "--json"])
    assert res.exit_code == code
    assert len(json.loads(res.output)) == (0 if code == 0 else 1)


def test_cli_model_enables_size_checks(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(zero3()))
    model = tmp_path / "config.json"
    model.write_text(json.dumps({**QWEN_SMALL}))
    res = CliRunner().invoke(main, ["lint", str(ds), "--model", str(model)])
    assert res.exit_code == 1 and "ZeRO-3 on a 0.49B-parameter model" in res.output
    assert "fix:" in res.output


QWEN_SMALL = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "intermediate_size": 4864,
    "vocab_size": 151936,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}
