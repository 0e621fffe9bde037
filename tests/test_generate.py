"""`infinity generate` against the same model held in memory (CPU, fp32: equal logits, so equal
tokens): a tokenizer from --tokenizer or found next to the store or its checkpoint, the end of
sequence per row, seeded sampling, the chat template, and one-line errors."""

import json
import os
import shutil
import sys
import tempfile

import pytest
import torch

from infinity.cli import run
from infinity.inference import convert
from infinity.inference.demo import build_checkpoint

PROMPTS = ["The quick brown fox", "0123456789"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _disk_dir(factory) -> str:
    base = os.environ.get("INFINITY_TEST_DIR")
    return tempfile.mkdtemp(prefix="infinity-gen-", dir=base) if base else str(factory.mktemp("s"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(in-memory model, its tokenizer, a store with the tokenizer, a store without one whose
    checkpoint has none either, the tokenizer's own folder)."""
    hf = str(tmp_path_factory.mktemp("hf"))
    reference, tokenizer = build_checkpoint(hf, layers=2, hidden=64)
    reference.requires_grad_(False)  # as streamed weights: the same matmul kernels
    base = _disk_dir(tmp_path_factory)
    store = os.path.join(base, "store")
    convert(hf, store)
    bare_hf = str(tmp_path_factory.mktemp("bare"))
    reference.save_pretrained(bare_hf)  # the weights and config alone
    bare = os.path.join(base, "bare")
    convert(bare_hf, bare)
    tok_dir = str(tmp_path_factory.mktemp("tok"))
    tokenizer.save_pretrained(tok_dir)
    return reference, tokenizer, store, bare, tok_dir


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`infinity generate ARGS --device cpu` as the console script runs it: (status, stdout,
    stderr)."""
    argv = ["infinity", "generate", *map(str, args), "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exited:
        run()
    out = capsys.readouterr()
    return exited.value.code, out.out, out.err


def as_json(monkeypatch, capsys, *args) -> dict:
    code, out, err = cli(monkeypatch, capsys, *args, "--json")
    assert code == 0, out + err
    return json.loads(out)


def continuation(reference, tokenizer, text: str, n: int, **kw) -> list[int]:
    """The in-memory model's ``n`` new tokens after ``text`` (greedy, end of sequence
    suppressed, unless ``kw`` says otherwise)."""
    ids = tokenizer([text], return_tensors="pt", add_special_tokens=kw.pop("special", True))
    kw = {"do_sample": False, "min_new_tokens": n} | kw
    with torch.no_grad():
        out = reference.generate(**ids, max_new_tokens=n, pad_token_id=0, **kw)
    return out[0, ids["input_ids"].shape[1] :].tolist()


def test_tokenizer_option_and_where_a_tokenizer_is_found(monkeypatch, capsys, tmp_path, model):
    reference, tokenizer, store, bare, tok_dir = model
    want = tokenizer.decode(continuation(reference, tokenizer, PROMPTS[0], 6))
    # neither the store nor its checkpoint has one: one line, exit 2, what to do
    code, out, err = cli(monkeypatch, capsys, bare, "--prompt", PROMPTS[0])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, out + err
    assert err.startswith(f"error: {bare} has no tokenizer: none of tokenizer.json, ")
    assert "the checkpoint it was converted from" in err and "--tokenizer DIR" in err
    # --tokenizer: a folder
    doc = as_json(monkeypatch, capsys, bare, "--tokenizer", tok_dir, "--prompt", PROMPTS[0],
                  "--max-new-tokens", "6", "--ignore-eos")  # fmt: skip
    assert doc["texts"] == [want] and doc["tokens"] == [6]
    # --tokenizer: a Hugging Face cache folder (refs/main names the snapshot; files are links)
    hub = tmp_path / "models--org--tiny"
    (hub / "blobs").mkdir(parents=True)
    (snapshot := hub / "snapshots" / "abc123").mkdir(parents=True)
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("abc123")
    for name in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, name), hub / "blobs" / f"hash-{name}")
        os.symlink(f"../../blobs/hash-{name}", snapshot / name)
    doc = as_json(monkeypatch, capsys, bare, "--tokenizer", hub, "--prompt", PROMPTS[0],
                  "--max-new-tokens", "6", "--ignore-eos")  # fmt: skip
    assert doc["texts"] == [want]
    # a folder without one, and one that does not exist: one line each
    for folder, message in ((tmp_path, "has no tokenizer"), (tmp_path / "no", "does not exist")):
        code, out, err = cli(monkeypatch, capsys, store, "--tokenizer", folder, "--prompt", "a")
        assert code == 2 and len(err.strip().splitlines()) == 1, out + err
        assert err.startswith(f"error: --tokenizer {folder} ") and message in err, err
    # a store whose tokenizer files were removed: the checkpoint's is used
    copy = tmp_path / "store"
    shutil.copytree(store, copy, symlinks=True)
    for name in os.listdir(tok_dir):
        os.remove(copy / name)
    doc = as_json(monkeypatch, capsys, copy, "--prompt", PROMPTS[0], "--max-new-tokens", "6",
                  "--ignore-eos")  # fmt: skip
    assert doc["texts"] == [want]


def test_end_of_sequence_stops_each_sequence(monkeypatch, capsys, tmp_path, model):
    """The end-of-sequence id set (in generation_config.json) to a token the model writes after
    the second prompt (the third or later): that row stops there, the first runs to the limit."""
    reference, tokenizer, store, _, _ = model
    n = 8
    rows = [continuation(reference, tokenizer, p, n) for p in PROMPTS]
    k, eos = next(
        (k, t) for k, t in enumerate(rows[1]) if k >= 2 and t not in rows[0] + rows[1][:k]
    )  # a token new in the second row, and not in the first
    assert tokenizer.eos_token_id not in rows[0] + rows[1][:k]
    copy = tmp_path / "store"
    shutil.copytree(store, copy, symlinks=True)
    config = json.loads((copy / "generation_config.json").read_text())
    config["eos_token_id"] = [tokenizer.eos_token_id, eos]
    (copy / "generation_config.json").write_text(json.dumps(config))

    doc = as_json(monkeypatch, capsys, copy, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                  "--batch-size", "2", "--max-new-tokens", str(n))  # fmt: skip
    assert doc["tokens"] == [n, n, k + 1, k + 1]  # the end-of-sequence token counts
    assert doc["stopped"] == ["length", "length", "eos", "eos"]
    assert doc["new_tokens"] == n and doc["batch_size"] == 4
    texts = [tokenizer.decode(rows[0]), tokenizer.decode(rows[1][:k])]
    assert doc["texts"] == [texts[0], texts[0], texts[1], texts[1]]
    assert doc["settings"]["eos_token_ids"] == [tokenizer.eos_token_id, eos]

    # one sequence alone stops after k + 1 of its n steps, and the text says so
    code, out, err = cli(monkeypatch, capsys, copy, "--prompt", PROMPTS[1], "--max-new-tokens", n)
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0] == PROMPTS[1] + texts[1], out  # streamed: the prompt, then the new text
    assert lines[1].startswith(f"1 x {k + 1} new tokens in "), out
    assert lines[1].endswith("; stopped at end of sequence") and lines[2] == "greedy", out
    # --ignore-eos: exactly n
    doc = as_json(monkeypatch, capsys, copy, "--prompt", PROMPTS[1], "--max-new-tokens", n,
                  "--ignore-eos")  # fmt: skip
    assert doc["tokens"] == [n] and doc["stopped"] == ["length"]


def test_seed_makes_sampling_repeatable(monkeypatch, capsys, model):
    reference, tokenizer, store, _, _ = model
    args = [store, "--prompt", PROMPTS[0], "--max-new-tokens", "12", "--ignore-eos",
            "--temperature", "1.5", "--top-k", "100", "--top-p", "0.95"]  # fmt: skip
    runs = {s: as_json(monkeypatch, capsys, *args, "--seed", s) for s in (1, 2)}
    first = as_json(monkeypatch, capsys, *args, "--seed", "1")
    assert runs[1]["texts"] == first["texts"]
    assert runs[2]["texts"] != first["texts"]
    settings = first["settings"]
    assert settings["do_sample"] and settings["seed"] == 1
    assert (settings["temperature"], settings["top_k"], settings["top_p"]) == (1.5, 100, 0.95)
    # the same draws as the in-memory model sampling after torch.manual_seed(1)
    torch.manual_seed(1)
    want = continuation(reference, tokenizer, PROMPTS[0], 12, do_sample=True, temperature=1.5,
                        top_k=100, top_p=0.95)  # fmt: skip
    assert first["texts"] == [tokenizer.decode(want)]
    greedy = as_json(monkeypatch, capsys, store, "--prompt", PROMPTS[0], "--max-new-tokens", "12",
                     "--ignore-eos", "--seed", "1")  # fmt: skip
    assert not greedy["settings"]["do_sample"] and greedy["texts"] != first["texts"]
    # top-k without a temperature is refused, in one line, before the model is loaded
    code, out, err = cli(monkeypatch, capsys, store, "--prompt", "a", "--top-k", "5")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "sampling is off" in err and "--temperature" in err


def test_chat_template_is_applied_when_present(monkeypatch, capsys, tmp_path, model):
    reference, tokenizer, store, _, tok_dir = model
    chat_dir = tmp_path / "chat"
    shutil.copytree(tok_dir, chat_dir)
    config = json.loads((chat_dir / "tokenizer_config.json").read_text())
    (chat_dir / "tokenizer_config.json").write_text(
        json.dumps(config | {"chat_template": CHAT_TEMPLATE})
    )
    templated = f"<s>user: {PROMPTS[0]}\nassistant:"
    want = continuation(reference, tokenizer, templated, 6, special=False)
    plain = continuation(reference, tokenizer, PROMPTS[0], 6)
    assert want != plain

    args = [store, "--tokenizer", chat_dir, "--prompt", PROMPTS[0], "--max-new-tokens", "6",
            "--ignore-eos"]  # fmt: skip
    doc = as_json(monkeypatch, capsys, *args)  # default: on, since the tokenizer has one
    assert doc["settings"]["chat"] is True and doc["texts"] == [tokenizer.decode(want)]
    assert doc["prompt_tokens"] == [len(tokenizer(templated, add_special_tokens=False).input_ids)]
    doc = as_json(monkeypatch, capsys, *args, "--no-chat")
    assert doc["settings"]["chat"] is False and doc["texts"] == [tokenizer.decode(plain)]
    # text: the reply alone (the template is not echoed), and a line that says so
    code, out, err = cli(monkeypatch, capsys, *args)
    assert code == 0 and out.splitlines()[0] == tokenizer.decode(want), out + err
    assert "greedy; chat template applied" in out.splitlines()
    # the store's tokenizer has no template: off by default, --chat refused in one line
    doc = as_json(monkeypatch, capsys, store, "--prompt", PROMPTS[0], "--max-new-tokens", "6",
                  "--ignore-eos")  # fmt: skip
    assert doc["settings"]["chat"] is False and doc["texts"] == [tokenizer.decode(plain)]
    code, out, err = cli(monkeypatch, capsys, store, "--prompt", PROMPTS[0], "--chat")
    assert code == 2 and len(err.strip().splitlines()) == 1, out + err
    assert "has no chat template: drop --chat" in err


def test_an_empty_prompt_among_several_is_refused(monkeypatch, capsys, model):
    _, _, store, _, _ = model
    code, out, err = cli(monkeypatch, capsys, store, "--prompt", "a", "--prompt", "")
    assert (
        code == 2
        and out == ""
        and err.strip() == ("error: the prompt is '': give some text to continue (--prompt TEXT)")
    ), err


def test_a_checkpoint_folder_is_converted_on_first_use(
    monkeypatch, capsys, tmp_path_factory, model
):
    """`infinity generate HF_DIR`: converted into INFINITY_CACHE on first use (as load does),
    reused the second time, the tokens those of the model held in memory. (``model``: its
    conversion loads DeepSpeed before capsys replaces stdout and stderr, as a process would.)"""
    hf = str(tmp_path_factory.mktemp("hf-direct"))
    reference, tokenizer = build_checkpoint(hf, layers=2, hidden=64)
    reference.requires_grad_(False)
    cache = _disk_dir(tmp_path_factory)
    monkeypatch.setenv("INFINITY_CACHE", cache)
    want = tokenizer.decode(continuation(reference, tokenizer, PROMPTS[0], 6))
    for _ in range(2):
        got = as_json(monkeypatch, capsys, hf, "--prompt", PROMPTS[0], "--max-new-tokens", 6,
                      "--ignore-eos")  # fmt: skip
        assert got["texts"] == [want] and got["tokens"] == [6]
        assert len(os.listdir(cache)) == 1  # one store, made once
