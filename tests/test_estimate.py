"""infinity.estimate: the arithmetic, shapes from config.json, DeepSpeed cross-checks, the CLI."""

import json
import re

import pytest
from click.testing import CliRunner

from infinity.cli import main
from infinity.errors import ConfigError
from infinity.estimate import ModelSpec, answer, check_model_config, estimate, parse_params

LLAMA2_7B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "intermediate_size": 11008,
    "vocab_size": 32000,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "tie_word_embeddings": False,
}
MISTRAL_7B = {
    **LLAMA2_7B,
    "model_type": "mistral",
    "intermediate_size": 14336,
    "num_key_value_heads": 8,
}
QWEN2_05B = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "intermediate_size": 4864,
    "vocab_size": 151936,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}


def scenario(est, name):
    (match,) = [s for s in est.scenarios if s.name == name]
    return match


def term(sc, prefix):
    (match,) = [t for t in sc.terms if t.name.startswith(prefix)]
    return match.nbytes


@pytest.mark.parametrize(
    "config, params",
    [
        (LLAMA2_7B, 6_738_415_616),  # published count of Llama-2-7b
        (MISTRAL_7B, 7_241_732_096),  # Mistral-7B-v0.1 (GQA, 8 KV heads)
        (QWEN2_05B, 494_032_768),  # Qwen2-0.5B (q/k/v biases, tied embeddings)
    ],
)
def test_param_count_from_hf_config(config, params):
    spec = ModelSpec.from_hf_config(config)
    assert spec.params == params
    assert spec.note == ""


def test_unknown_architecture_is_counted_and_says_so():
    spec = ModelSpec.from_hf_config({**LLAMA2_7B, "model_type": "newthing"})
    assert spec.params == 6_738_415_616
    assert "newthing" in spec.note and "Llama-style" in spec.note


def test_missing_fields_name_them(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gpt2", "n_embd": 768, "vocab_size": 50257}))
    with pytest.raises(ConfigError, match="hidden_size.*num_hidden_layers.*--params"):
        ModelSpec.from_hf_config(path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": -64}, "hidden_size = -64 is not a whole number from 1 to 1,048,576"),
        ({"hidden_size": 0}, "hidden_size = 0 is not"),
        ({"num_hidden_layers": 100_000}, "num_hidden_layers = 100000 is not a whole "
                                         "number from 1 to 1,024 "),
        ({"num_hidden_layers": 1e9}, "lacks integer ['num_hidden_layers']"),
        ({"vocab_size": 10**30}, "vocab_size = 1000000000000000000000000000000 is not"),
        ({"num_attention_heads": 0}, "num_attention_heads = 0 is not"),
        ({"num_key_value_heads": -8}, "num_key_value_heads = -8 is not"),
        ({"head_dim": 2.5}, "head_dim = 2.5 is not"),
        ({"num_local_experts": 1_000_000}, "num_local_experts = 1000000 is not"),
        ({"num_hidden_layers": 1024, "num_local_experts": 1024}, "1,048,576 blocks, over 65,536"),
    ],
)  # fmt: skip
def test_absurd_or_negative_dimensions_are_refused(change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ModelSpec.from_hf_config({**LLAMA2_7B, **change})


def test_dimension_checks_accept_real_shapes_and_read_nested_sections():
    per_layer = {**LLAMA2_7B, "intermediate_size": [11008] * 32, "head_dim": None}
    check_model_config(per_layer, "gemma3n-style")  # one intermediate_size per layer
    moe = {**LLAMA2_7B, "num_hidden_layers": 61, "n_routed_experts": 256, "num_experts": None}
    check_model_config(moe, "deepseek-v3-style")
    with pytest.raises(ConfigError, match=re.escape("text_config.num_hidden_layers = 1000000")):
        check_model_config({"text_config": {"num_hidden_layers": 10**6}}, "multimodal")
    with pytest.raises(ConfigError, match=re.escape("intermediate_size = -1 is not")):
        check_model_config({"intermediate_size": [11008, -1]}, "per-layer")


@pytest.mark.parametrize("params", [float("nan"), float("inf"), 1e400, -1, 0, 1e16, 2.5])
def test_params_must_be_a_finite_positive_whole_number(params):
    with pytest.raises(ConfigError, match="whole number from 1 to 1e[+]15"):
        ModelSpec.from_params(params)


def test_model_config_that_is_not_an_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="holds a JSON list, not an object"):
        ModelSpec.from_hf_config(path)
    path.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        ModelSpec.from_hf_config(path)


def test_7b_data_parallel_needs_112_gb_not_60():
    est = estimate(ModelSpec.from_params(7e9), stages=(0,), inference=False)
    (dp,) = est.scenarios
    assert dp.total("gpu") == 16 * 7_000_000_000 == 112_000_000_000


@pytest.mark.parametrize(
    "stage, per_gpu",
    [
        (0, 16e9),
        (1, 2e9 + 2e9 + 12e9 / 4 + 1e9),  # + one 5e8-element 16-bit reduce bucket
        (2, 2e9 + 14e9 / 4 + 1e9),
        (3, 16e9 / 4),  # no gathered-layer term without shapes
    ],
)
def test_zero_stages_per_gpu(stage, per_gpu):
    est = estimate(ModelSpec.from_params(1e9), gpus=4, stages=(stage,), offload="none")
    (sc,) = [s for s in est.scenarios if s.kind == "training"]
    assert sc.total("gpu") == per_gpu
    assert sc.total("host") == sc.total("nvme") == 0


def test_offload_moves_states_off_the_gpu():
    est = estimate(ModelSpec.from_hf_config(LLAMA2_7B), gpus=8, stages=(3,), inference=False)
    psi, big = 6_738_415_616, 32000 * 4096
    both_nvme = scenario(est, "ZeRO-3, offload_optimizer=nvme, offload_param=nvme")
    assert both_nvme.total("gpu") == 4 * big  # only the gathered layer stays
    assert both_nvme.total("nvme") == 18 * psi  # (2 + 4 + 12) x psi / N x 8 GPUs
    # pinned swap buffers: 4 x min(1e9, psi/8) x 4 B + 5 x 1e8 x 2 B, per GPU, 8 GPUs
    assert both_nvme.total("host") == 8 * (4 * -(-psi // 8) * 4 + 5 * 10**8 * 2)
    cpu = scenario(est, "ZeRO-3, offload_optimizer=cpu")
    assert cpu.total("host") == 16 * psi and cpu.total("nvme") == 0
    assert [s.offload for s in estimate(ModelSpec.from_params(1e9), offload="nvme").scenarios] == [
        "nvme",
        "nvme",
    ]


def test_activations_formulas():
    spec = ModelSpec.from_hf_config(LLAMA2_7B)
    s, b, h, a, n_layers, v = 4096, 1, 4096, 32, 32, 32000
    est = estimate(spec, batch=b, seq=s, inference=False)
    per_layer = s * b * h * 34 + 5 * a * s * s * b
    assert est.activation_bytes("no checkpointing") == n_layers * per_layer + 4 * s * b * v
    assert est.activation_bytes("full checkpointing") == (
        n_layers * 2 * s * b * h + per_layer + 4 * s * b * v
    )
    flash = estimate(spec, batch=b, seq=s, flash_attention=True, inference=False)
    assert flash.activation_bytes("no checkpointing") == n_layers * s * b * h * 34 + 4 * s * b * v


def test_streamed_inference_kv_cache_and_resident_layers():
    spec = ModelSpec.from_hf_config(MISTRAL_7B)
    est = estimate(spec, stages=(), batch=2, seq=8192, gpu_budget_bytes=8 * 10**9)
    kv = 2 * 32 * 2 * 8192 * 8 * 128 * 2  # GQA: 8 KV heads of 128
    cpu = scenario(est, "inference streamed from CPU (bf16)")
    assert term(cpu, "KV cache") == kv
    layer = 2 * spec.layer_params
    other = 2 * (spec.params - 32 * spec.layer_params)
    resident = (8 * 10**9 - other - kv - 2 * layer) // layer
    assert term(cpu, "resident layers") == resident * layer
    assert cpu.total("gpu") <= 8 * 10**9 < cpu.total("gpu") + layer
    assert cpu.total("host") == (32 - resident) * layer
    nvme = scenario(est, "inference streamed from NVMe (bf16)")
    assert nvme.total("nvme") == (32 - resident) * layer
    assert nvme.total("host") == 2 * layer  # staging buffers only, no --host-budget
    full = scenario(est, "inference, all weights on GPU (bf16)")
    assert full.total("gpu") == 2 * spec.params + kv


def test_bad_arguments_are_config_errors():
    spec = ModelSpec.from_params(1e9)
    with pytest.raises(ConfigError, match="multiple of nodes"):
        estimate(spec, gpus=3, nodes=2)
    with pytest.raises(ConfigError, match="--batch and --seq"):
        estimate(spec, batch=4)
    with pytest.raises(ConfigError, match="stage"):
        estimate(spec, stages=(4,))


# DeepSpeed's estimators (runtime/zero/stage3.py, stage_1_and_2.py) count model states with
# their own assumptions; where they overlap with ours they must agree, and where they differ
# the difference must be exactly the term DeepSpeed adds.
@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_zero2_matches_deepspeed(gpus):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    psi = 6_738_415_616
    est = estimate(ModelSpec.from_params(psi), gpus=gpus, stages=(2,), inference=False)
    plain, off = est.scenarios
    ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(
        psi, num_gpus_per_node=gpus, cpu_offload=False
    )
    ours = plain.total("gpu") - term(plain, "gradient reduce bucket")
    # DeepSpeed's 18 bytes per partitioned parameter also count a 4-byte fp32 gradient copy
    # on the GPU; the ZeRO paper's 2 + 12 do not.
    assert ds_gpu - ours == pytest.approx(4 * psi / gpus, abs=2)
    ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(
        psi, num_gpus_per_node=gpus, cpu_offload=True
    )
    assert ds_gpu == term(off, "16-bit weights")
    # host: DeepSpeed = max(4N, 16) x psi x 1.5 (its additional_buffer_factor); for N <= 4
    # that is our 16 psi (fp32 gradients + optimizer states) times 1.5.
    assert ds_cpu == pytest.approx(1.5 * off.total("host"), rel=1e-9)


@pytest.mark.parametrize("gpus", [1, 8])
def test_zero3_matches_deepspeed(gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    spec = ModelSpec.from_hf_config(LLAMA2_7B)
    psi, big = spec.params, spec.largest_tensor_numel
    est = estimate(spec, gpus=gpus, stages=(3,), inference=False)
    none = scenario(est, "ZeRO-3")
    opt = scenario(est, "ZeRO-3, offload_optimizer=cpu")
    both = scenario(est, "ZeRO-3, offload_optimizer=cpu, offload_param=cpu")

    def ds(offload, params):
        return estimate_zero3_model_states_mem_needs(
            psi, big, num_gpus_per_node=gpus, cpu_offload=offload, cpu_offload_params=params
        )

    # no offload: DeepSpeed counts 18 bytes per partitioned parameter (an extra 2) and the same
    # 4 x largest-layer gather buffer we do
    ds_cpu, ds_gpu, ds_layer = ds(False, False)
    assert ds_layer == 4 * big
    assert ds_gpu - none.total("gpu") == pytest.approx(2 * psi / gpus, abs=2)
    # offload_optimizer: GPU = 2 psi / N + gather buffer, exactly; host = ours x 1.5
    ds_cpu, ds_gpu, _ = ds(True, False)
    assert ds_gpu == opt.total("gpu")
    assert ds_cpu == pytest.approx(1.5 * opt.total("host"), rel=1e-9)
    # offload_param too: 18 bytes per parameter on the host, the gather buffer on the GPU
    ds_cpu, ds_gpu, _ = ds(True, True)
    assert ds_gpu == both.total("gpu")
    assert ds_cpu == pytest.approx(1.5 * both.total("host"), rel=1e-9)
    # DeepSpeed has no NVMe term; ours puts the same bytes on the drive
    nvme = scenario(est, "ZeRO-3, offload_optimizer=nvme, offload_param=nvme")
    assert nvme.total("nvme") == pytest.approx(both.total("host"), abs=8)


def test_cli_json_and_table(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["estimate", "--params", "7B", "--stage", "0", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    dp = [s for s in data["scenarios"] if s["name"] == "data parallel"][0]
    assert dp["totals_bytes"]["gpu"] == 112_000_000_000
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA2_7B))
    res = runner.invoke(
        main, ["estimate", "--model", str(path), "--gpus", "8", "--batch", "1", "--seq", "2048"]
    )
    assert res.exit_code == 0, res.output
    assert "12 B x Ψ / N = 12 x 6.74e9 / 8" in res.output
    assert "full checkpointing" in res.output and "KV cache" in res.output


def test_cli_needs_exactly_one_model_source():
    res = CliRunner().invoke(main, ["estimate"])
    assert res.exit_code == 2 and "exactly one of --params and --model" in res.output


def test_cli_bad_arguments_exit_2_with_the_fix():
    import subprocess
    import sys

    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "from infinity.cli import run; run()",
            "estimate",
            "--params",
            "1e9",
            "--gpus",
            "3",
            "--nodes",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert "error: --gpus 3 over --nodes 2" in res.stderr and "multiple of nodes" in res.stderr


# -- counts with suffixes, and the answer first -----------------------------------------------
@pytest.mark.parametrize(
    "text, count",
    [("125M", 125 * 10**6), ("7B", 7 * 10**9), ("7b", 7 * 10**9), ("1.5T", 15 * 10**11),
     ("70e9", 70 * 10**9), ("1.1B", 11 * 10**8), ("0.5B", 5 * 10**8), ("12345", 12345),
     ("7_000_000_000", 7 * 10**9), ("340k", 340_000)],
)  # fmt: skip
def test_param_counts_take_the_usual_suffixes(text, count):
    assert parse_params(text) == count


@pytest.mark.parametrize(
    "text, message",
    [("70", "'70' would be 70 parameters: did you mean 70B?"), ("9999", "did you mean 9999B?"),
     ("7X", "is not a parameter count: use a number with a suffix, such as 125M, 7B, 1.5T"),
     ("7GB", "is not a parameter count"), ("", "is not a parameter count"),
     ("1.2345678901B", "not a positive whole number"), ("0", "not a positive whole number"),
     ("-7B", "not a positive whole number"), ("2000T", "whole number from 1 to 1e+15")],
)  # fmt: skip
def test_bare_small_or_malformed_counts_are_refused(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_params(text)


def test_cli_refuses_70_parameters_with_a_hint_and_takes_suffixes():
    res = CliRunner().invoke(main, ["estimate", "--params", "70"])
    assert res.exit_code == 2 and "did you mean 70B?" in res.output, res.output
    assert "GB" not in res.output  # refused, not estimated
    res = CliRunner().invoke(main, ["estimate", "--params", "1.5T", "--json", "--gpu-budget",
                                    "80GB", "--host-budget", "1TB"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["model"]["params"] == 1_500_000_000_000


def _lines(*args: str) -> list[str]:
    res = CliRunner().invoke(main, ["estimate", *args])
    assert res.exit_code == 0, res.output
    return res.output.splitlines()


def test_the_answer_comes_first(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA2_7B))
    psi = ModelSpec.from_hf_config(LLAMA2_7B).params
    # 8 GPUs of 80 GB: data parallel needs 16 B x Ψ = 108 GB per GPU; ZeRO-1 4 B x Ψ + 12 B x
    # Ψ / 8 + the 1 GB reduce bucket = 38 GB fits, without offload
    lines = _lines("--model", str(path), "--gpus", "8", "--gpu-budget", "80GB",
                   "--host-budget", "1TB")  # fmt: skip
    zero1 = 4 * psi + 12 * psi // 8 + 10**9
    assert lines[0] == (
        "Training fits 8 GPUs of 80.00 GB and 1,000.00 GB of host memory: ZeRO-1, "
        f"{zero1 / 1e9:.2f} GB per GPU"
    )
    assert lines[1] == (
        "Inference fits 8 GPUs of 80.00 GB and 1,000.00 GB of host memory: all weights on GPU "
        f"(bf16), {2 * psi / 1e9:.2f} GB per GPU"
    )
    assert lines[2].startswith("model: 6,738,415,616 parameters")
    budgets = "GPU 80.00 GB (--gpu-budget), host 1,000.00 GB (--host-budget)"
    assert lines[3] == f"checked against: {budgets}"
    # 1 GPU of 24 GB, 15 GB of host memory: every offload needs more host memory (the NVMe
    # swap buffers of the optimizer alone: 4 x 1e9 x 4 B = 16 GB); the least GPU memory is with
    # ZeRO-3 and everything on NVMe (the largest tensor gathered, 4 B x 32000 x 4096)
    lines = _lines("--model", str(path), "--gpu-budget", "24GB", "--host-budget", "15GB")
    assert lines[0] == (
        "Training does not fit 1 GPU of 24.00 GB and 15.00 GB of host memory; at the least: "
        "ZeRO-3, offload_optimizer=nvme, offload_param=nvme, 0.52 GB per GPU, 17.00 GB host "
        f"(over), {18 * psi / 1e9:,.2f} GB NVMe"
    )
    assert lines[1].startswith("Inference fits 1 GPU of 24.00 GB and 15.00 GB of host memory:")
    # 12 GB: all weights (13.5 GB) do not fit; streamed from the CPU does, with as many resident
    # layers as --gpu-budget allows
    lines = _lines("--model", str(path), "--gpu-budget", "12GB", "--host-budget", "16GB")
    assert lines[1].startswith(
        "Inference fits 1 GPU of 12.00 GB and 16.00 GB of host memory: streamed from CPU (bf16)"
    ), lines[1]
    # activations: without checkpointing they do not fit 80 GB at 8k tokens; with full
    # checkpointing they do
    lines = _lines("--model", str(path), "--gpus", "8", "--gpu-budget", "80GB", "--host-budget",
                   "1TB", "--batch", "1", "--seq", "8192")  # fmt: skip
    assert lines[0].startswith("Training fits 8 GPUs of 80.00 GB and 1,000.00 GB of host memory: ")
    assert "+ activations (full checkpointing)" in lines[0], lines[0]


def test_answer_picks_the_least_offload_that_fits():
    spec = ModelSpec.from_hf_config(LLAMA2_7B)
    est = estimate(spec, gpus=8)
    training, inference = answer(est, 80 * 10**9, 10**12)
    assert (training.fits, training.scenario, training.over) == (True, "ZeRO-1", ())
    assert inference.scenario == "inference, all weights on GPU (bf16)"
    # 16 GB GPUs, 500 GB host: ZeRO-3 without offload fits (16 B x Ψ / 8 = 13.5 GB and the
    # gathered layer); of stages 1 and 2, only with the optimizer on the CPU, the lower stage
    # first: 2 B x Ψ of weights + the bucket on the GPU, 16 B x Ψ / 8 x 8 GPUs on the host
    training, _ = answer(est, 16 * 10**9, 500 * 10**9)
    assert training.fits and training.scenario == "ZeRO-3", training
    training, _ = answer(estimate(spec, gpus=8, stages=(1, 2)), 16 * 10**9, 500 * 10**9)
    assert training.fits and training.scenario == "ZeRO-1, offload_optimizer=cpu", training
    assert training.gpu_bytes == 2 * spec.params + 10**9
    assert training.host_bytes == 16 * spec.params
    # no GPU budget: not judged, the least GPU memory within the host budget
    training, inference = answer(est, None, 500 * 10**9)
    assert training.fits is None and training.host_bytes <= 500 * 10**9
    assert training.gpu_bytes == min(
        s.total("gpu") for s in est.scenarios if s.kind == "training" and s.total("host") <= 5e11
    )


def test_details_are_not_cut_when_piped(tmp_path):
    """Not a terminal: the table is as wide as it needs, whatever COLUMNS says."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA2_7B))
    res = CliRunner().invoke(
        main,
        ["estimate", "--model", str(path), "--batch", "1", "--seq", "2048", "--gpu-budget",
         "80GB", "--host-budget", "1TB"],
        env={"COLUMNS": "60"},
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    kv = "2 x L x b x s x kv_heads x head_dim x 2 B = 2 x 32 x 1 x 2048 x 32 x 128 x 2"
    assert any(kv in line for line in res.output.splitlines()), res.output
    table = [line for line in res.output.splitlines() if line[:1] in "┏┃┡│├└"]
    assert len({len(line) for line in table}) == 1 and len(table[0]) > 60
    assert "…" not in res.output


def test_budgets_default_to_this_machine():
    import psutil

    res = CliRunner().invoke(main, ["estimate", "--params", "7B", "--json"])
    assert res.exit_code == 0, res.output
    budgets = json.loads(res.output)["budgets"]
    assert budgets["host_from"] == "this machine"
    assert 0 < budgets["host_bytes"] <= psutil.virtual_memory().total
    line = _lines("--params", "7B")[3]
    assert line.startswith("checked against: ") and "(this machine)" in line, line
