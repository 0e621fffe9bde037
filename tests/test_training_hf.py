"""OffloadedAdamW under Hugging Face's Trainer (CPU, a tiny random Llama): the loss falls with
Trainer's clipping or the optimizer's, Trainer's checkpoints save the small state_dict, and a
resume from the newest checkpoint goes on while one from an older checkpoint is refused."""

import os

import pytest
import torch
from store_helpers import small_config

from infinity.training import OffloadedAdamW, StaleStateError

transformers = pytest.importorskip("transformers")


class Repeated(torch.utils.data.Dataset):
    """Eight fixed sequences, over and over: a model that learns lowers their loss."""

    def __init__(self, length=256):
        g = torch.Generator().manual_seed(0)
        self.rows = torch.randint(0, 128, (8, 16), generator=g)
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        row = self.rows[i % len(self.rows)]
        return {"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)}


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def mean_loss(model, data):
    model.eval()
    with torch.no_grad():
        batch = {k: torch.stack([data[i][k] for i in range(8)]) for k in data[0]}
        loss = model(**batch).loss.item()
    model.train()
    return loss


def arguments(out, max_steps, **kw):
    return transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=4, max_steps=max_steps, learning_rate=3e-3,
        logging_steps=5, report_to=[], use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True, **kw,
    )  # fmt: skip


def train(disk_dir, name, clipping, optimizer="ours"):
    """20 Trainer steps; clipping by "trainer" (max_grad_norm=1.0) or by the "optimizer"
    (Trainer's max_grad_norm=0: no double clip). Ours built by us with a scheduler, or by
    Trainer from ``optimizer_cls_and_kwargs`` (with its decay / no-decay groups)."""
    model, data = tiny_llama(), Repeated()
    path, out = os.path.join(disk_dir, name), os.path.join(disk_dir, name + "-out")
    clip = {"max_grad_norm": 0} if clipping == "optimizer" else {}
    args = arguments(out, 20, save_strategy="no", **clip)
    if optimizer == "ours" and clipping == "trainer":
        opt = OffloadedAdamW(model.parameters(), path, lr=3e-3, store_config=small_config(0))
        sched = transformers.get_linear_schedule_with_warmup(opt, 2, 20)
        kw = {"optimizers": (opt, sched)}
    elif optimizer == "ours":
        kwargs = dict(store=path, lr=3e-3, max_grad_norm=1.0, store_config=small_config(0))
        kw = {"optimizer_cls_and_kwargs": (OffloadedAdamW, kwargs)}
    else:  # the reference: torch's AdamW, Trainer's clipping
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
        sched = transformers.get_linear_schedule_with_warmup(opt, 2, 20)
        kw = {"optimizers": (opt, sched)}
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, **kw)
    trainer.train()
    return model, trainer.optimizer.optimizer  # accelerate's wrapper around it


@pytest.mark.parametrize("clipping", ["trainer", "optimizer"])
def test_trainer_lowers_the_loss(disk_dir, clipping):
    data = Repeated()
    before = mean_loss(tiny_llama(), data)
    model, opt = train(disk_dir, "opt", clipping)
    assert isinstance(opt, OffloadedAdamW)
    if clipping == "optimizer":
        assert len(opt.param_groups) == 2 and opt.param_groups[1]["weight_decay"] == 0.0
        assert opt.last_grad_norm is not None
    steps = {float(opt.state[p]["step"]) for p in model.parameters()}
    opt.close()
    assert steps == {20.0}
    after = mean_loss(model, data)
    assert after < before - 0.5, (before, after)
    if clipping == "trainer":  # the same run with torch's AdamW: the same weights, bit for bit
        ref, _ = train(disk_dir, "ref", clipping, optimizer="torch")
        for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            assert torch.equal(p, q), name


def test_trainer_checkpoints_resume_and_overwritten_ones_are_refused(disk_dir):
    out, path = os.path.join(disk_dir, "out"), os.path.join(disk_dir, "opt")
    model, data = tiny_llama(), Repeated()
    opt = OffloadedAdamW(model.parameters(), path, lr=3e-3, store_config=small_config(0))
    args = arguments(out, 10, save_strategy="steps", save_steps=5)
    transformers.Trainer(model=model, args=args, train_dataset=data,
                         optimizers=(opt, None)).train()  # fmt: skip
    opt.close()
    saved = os.path.getsize(os.path.join(out, "checkpoint-10", "optimizer.pt"))
    assert saved < 64 << 10  # the fp32 states stay in the store

    def resume(checkpoint):
        model = tiny_llama()
        opt = OffloadedAdamW(model.parameters(), path, lr=3e-3, store_config=small_config(0))
        trainer = transformers.Trainer(model=model, args=arguments(out, 15, save_strategy="no"),
                                       train_dataset=data, optimizers=(opt, None))  # fmt: skip
        try:
            trainer.train(resume_from_checkpoint=os.path.join(out, checkpoint))
            return {float(opt.state[p]["step"]) for p in model.parameters()}
        finally:
            opt.close()

    assert resume("checkpoint-10") == {15.0}  # steps 11-15 write the slot checkpoint-5 was in
    with pytest.raises(StaleStateError):
        resume("checkpoint-5")
