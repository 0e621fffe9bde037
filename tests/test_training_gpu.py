"""OffloadedAdamW with the model on the GPU (run on the GPU machine: pytest -m gpu): the
gradients leave the GPU per tile, the update runs on the CPU, the new bf16 weights go back;
bit for bit the same as torch's AdamW on fp32 CPU masters of the same GPU model."""

import pytest
import torch
from test_training import MasterAdamW, batches, make_model, new_opt

pytestmark = pytest.mark.gpu


def loss_of(model, batch):
    x, y = (t.cuda() for t in batch)
    return torch.nn.functional.mse_loss(model(x).float(), y.float())


@pytest.mark.parametrize("pinned_bytes", [0, "1MiB"])
def test_gpu_model_equals_torch_adamw_on_cpu_masters(disk_dir, pinned_bytes):
    model = make_model(torch.bfloat16).cuda()
    ref_model = make_model(torch.bfloat16).cuda()
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)
    opt = new_opt(model.parameters(), disk_dir, tile_bytes="16KiB", max_grad_norm=0.5,
                  pinned_bytes=pinned_bytes, **kw)  # fmt: skip
    ref = MasterAdamW(ref_model, **kw)
    data = batches(6, torch.bfloat16)
    losses = []
    for batch in data:
        loss = loss_of(model, batch)
        loss.backward()
        loss_of(ref_model, batch).backward()
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.5)
        opt.step()
        ref.step()
        opt.zero_grad()
        ref_model.zero_grad()
        losses.append(float(loss))
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
            assert p.is_cuda and torch.equal(p, q), name
    sd = opt.state_dict()
    assert sd["infinity"]["initialized"]
    opt.close()
    assert losses[-1] < losses[0], losses
