"""OffloadedAdamW on the CPU against torch's own AdamW (fused, the default), bit for bit: fp32
and bf16 models, param groups, LR schedulers, gradient accumulation, clipping, tiles cut across
parameters, states streamed from disk or kept pinned, and resuming from a state_dict."""

import copy
import io
import os

import pytest
import torch
from store_helpers import small_config

from infinity import CapacityError, ConfigError, InfinityError
from infinity.training import OffloadedAdamW, StaleStateError


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(24, 96), torch.nn.GELU(), torch.nn.Linear(96, 40), torch.nn.GELU(),
        torch.nn.Linear(40, 8),
    )  # fmt: skip
    return model.to(dtype)


def batches(count, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 24, generator=g).to(dtype), torch.randn(16, 8, generator=g).to(dtype))
        for _ in range(count)
    ]


def backward(model, batch, scale=1.0, scaler=None):
    x, y = batch
    loss = torch.nn.functional.mse_loss(model(x).float(), y.float()) * scale
    (loss if scaler is None else scaler.scale(loss)).backward()
    return loss.detach()


def groups(model, lr=1e-2):
    """Two groups with their own hyperparameters: weights and biases."""
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if n.endswith("weight")], "weight_decay": 0.1},
        {"params": [p for n, p in named if n.endswith("bias")], "lr": lr * 3,
         "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.0},
    ]  # fmt: skip


class MasterAdamW:
    """The reference for half models (on the CPU or the GPU): fp32 masters on the CPU updated by
    torch's fused AdamW, cast back."""

    def __init__(self, model, **kw):
        self.model = model
        self.masters = [p.detach().to("cpu", torch.float32, copy=True).requires_grad_()
                        for p in model.parameters()]  # fmt: skip
        self.opt = torch.optim.AdamW(self.masters, fused=True, **kw)

    def step(self):
        for m, p in zip(self.masters, self.model.parameters(), strict=True):
            m.grad = None if p.grad is None else p.grad.to("cpu", torch.float32)
        self.opt.step()
        with torch.no_grad():
            for m, p in zip(self.masters, self.model.parameters(), strict=True):
                p.copy_(m)


def new_opt(params, disk_dir, name="opt", **kw):
    kw.setdefault("store_config", small_config(pinned_bytes=0))
    return OffloadedAdamW(params, os.path.join(disk_dir, name), **kw)


def assert_same_params(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert p.dtype == q.dtype
        assert torch.equal(p, q), f"{name}: max diff {(p.float() - q.float()).abs().max()}"


def stored_states(opt):
    """{(param index, state name): the stored fp32 state, slices joined}."""
    opt.flush()
    out = {}
    for i, tile in enumerate(opt._tiles):
        stored = iter(opt._executor.stored_keys(i))  # the slot each tile is in now
        for s in tile.slices:
            for name in s.keys:
                out.setdefault((s.param, name), []).append(opt.store.get(next(stored)))
    return {k: torch.cat(v) for k, v in out.items()}


# tile_bytes 16 KiB cuts the 96x24 and 40x96 weights into slices; pinned_bytes 0 (raised to
# three tiles) streams every tile from disk each step, 1 MiB keeps them all pinned
@pytest.mark.parametrize("pinned_bytes", [0, "1MiB"])
def test_fp32_equals_torch_adamw_with_groups_scheduler_and_accumulation(disk_dir, pinned_bytes):
    model, ref_model = make_model(), make_model()
    opt = new_opt(groups(model), disk_dir, lr=1e-2, tile_bytes="16KiB", pinned_bytes=pinned_bytes)
    ref = torch.optim.AdamW(groups(ref_model), lr=1e-2, fused=True)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, ref)]
    assert len(opt._tiles) > 3 and any(s.start for t in opt._tiles for s in t.slices)
    data = batches(12)
    for step in range(6):
        for m in (model, ref_model):  # two micro-batches accumulate into .grad
            backward(m, data[2 * step], 0.5)
            backward(m, data[2 * step + 1], 0.5)
        opt.step()
        ref.step()
        for s in scheds:
            s.step()
        opt.zero_grad(set_to_none=step % 2 == 0)
        ref.zero_grad(set_to_none=step % 2 == 0)
        assert_same_params(model, ref_model)
    assert opt.param_groups[1]["lr"] == ref.param_groups[1]["lr"] == 3e-2 * 0.5**3
    stats = opt.stats()  # before reading the states back through the store
    states = stored_states(opt)
    ours = [p for g in opt.param_groups for p in g["params"]]  # the state_dict's numbering
    theirs = [p for g in ref.param_groups for p in g["params"]]
    for i, (p, q) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.equal(states[(i, "exp_avg")], ref.state[q]["exp_avg"].view(-1))
        assert torch.equal(states[(i, "exp_avg_sq")], ref.state[q]["exp_avg_sq"].view(-1))
        assert (i, "master") not in states  # an fp32 CPU parameter is its own master
        assert float(opt.state[p]["step"]) == 6
    sizes = [t.unit.nbytes for t in opt._tiles]
    kept = opt._executor.plan.resident_gpu | opt._executor.plan.resident_pinned
    opt.close()
    assert stats["steps"] == 6 * len(opt._tiles)
    if pinned_bytes == 0:  # the tiles not kept resident are written back every step
        assert len(kept) < len(sizes), stats["plan"]
        streamed = sum(n for i, n in enumerate(sizes) if i not in kept)
        assert stats["disk_write_bytes"] >= 6 * streamed
    else:  # all kept: read once, written by the first step's initial states only
        stored = sum(p.nbytes for t in opt._tiles for p in t.unit.pieces)
        assert stats["disk_bytes"] == stats["disk_write_bytes"] == stored
        assert stats["fallbacks"] == 0


def test_single_tensor_kernels_equal_torch_single_tensor_adamw(disk_dir):
    """The default is torch's fused kernel (the other tests); fused=False gives torch's
    single-tensor kernels, bit for bit too."""
    model, ref_model = make_model(), make_model()
    opt = new_opt(model.parameters(), disk_dir, lr=1e-2, fused=False, tile_bytes="16KiB")
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, foreach=False)
    for batch in batches(3):
        for m, o in ((model, opt), (ref_model, ref)):
            backward(m, batch)
            o.step()
            o.zero_grad()
    assert_same_params(model, ref_model)
    opt.close()


@pytest.mark.parametrize("clip", ["option", "caller"])
def test_bf16_masters_and_clipping_equal_fp32_masters_with_torch(disk_dir, clip):
    model, ref_model = make_model(torch.bfloat16), make_model(torch.bfloat16)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)
    opt = new_opt(model.parameters(), disk_dir, tile_bytes="16KiB",
                  max_grad_norm=0.05 if clip == "option" else None, **kw)  # fmt: skip
    ref = MasterAdamW(ref_model, **kw)
    clipped = 0
    for batch in batches(5, torch.bfloat16):
        backward(model, batch)
        backward(ref_model, batch)
        if clip == "caller":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.05)
        clipped += bool(norm > 0.05)
        opt.step()
        ref.step()
        if clip == "option":
            assert torch.equal(opt.last_grad_norm, norm)
        opt.zero_grad()
        ref_model.zero_grad()
        assert_same_params(model, ref_model)
    assert clipped >= 3  # the clip did act
    states = stored_states(opt)
    for i, master in enumerate(ref.masters):
        assert torch.equal(states[(i, "master")], master.detach().view(-1))
        assert torch.equal(states[(i, "exp_avg")], ref.opt.state[master]["exp_avg"].view(-1))
    opt.close()


def test_clipping_fp32_equals_clip_grad_norm_then_adamw(disk_dir):
    model, ref_model = make_model(), make_model()
    opt = new_opt(model.parameters(), disk_dir, lr=1e-2, max_grad_norm=0.1)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, fused=True)
    for batch in batches(4):
        backward(model, batch)
        backward(ref_model, batch)
        norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.1)
        assert norm > 0.1
        opt.step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
        assert_same_params(model, ref_model)
    opt.close()


def run(model, opt, data):
    for batch in data:
        backward(model, batch)
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("pinned_bytes", [0, "1MiB"])
def test_resume_from_state_dict_equals_the_uninterrupted_run(disk_dir, pinned_bytes):
    data = batches(6, torch.bfloat16)
    kw = dict(lr=1e-2, tile_bytes="16KiB", pinned_bytes=pinned_bytes)
    straight = make_model(torch.bfloat16)
    opt = new_opt(groups(straight), disk_dir, "a", **kw)
    run(straight, opt, data)
    want = stored_states(opt)
    opt.close()

    model = make_model(torch.bfloat16)
    opt = new_opt(groups(model), disk_dir, "b", **kw)
    run(model, opt, data[:3])
    sd = opt.state_dict()
    blob = io.BytesIO()
    torch.save(sd, blob)
    state_bytes = sum(t.unit.nbytes for t in opt._tiles)
    assert blob.tell() < state_bytes / 8  # the states stay in the store
    saved_model = copy.deepcopy(model.state_dict())
    opt.close()  # the process ends here

    model = make_model(torch.bfloat16, seed=7)  # other weights: the checkpoint's are loaded
    model.load_state_dict(saved_model)
    opt = new_opt(groups(model), disk_dir, "b", **kw)
    opt.load_state_dict(torch.load(io.BytesIO(blob.getvalue()), weights_only=True))
    run(model, opt, data[3:])
    assert_same_params(model, straight)
    got = stored_states(opt)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert opt.param_groups[1]["lr"] == 3e-2

    # two slots: sd's states stay intact until the next state_dict commits and a step follows
    newest = opt.state_dict()
    run(model, opt, data[:1])
    with pytest.raises(StaleStateError, match="newest state_dict"):
        opt.load_state_dict(sd)
    opt.close()
    opt = new_opt(groups(model), disk_dir, "b", **kw)
    with pytest.raises(StaleStateError, match="changed since this state_dict"):
        opt.load_state_dict(sd)
    opt.load_state_dict(newest)
    opt.close()


def test_a_state_dict_of_other_parameters_is_refused(disk_dir):
    model = make_model()
    opt = new_opt(model.parameters(), disk_dir, "a")
    run(model, opt, batches(1))
    sd = opt.state_dict()
    opt.close()
    other = torch.nn.Linear(24, 8)
    opt = new_opt(other.parameters(), disk_dir, "c")
    with pytest.raises(ConfigError, match="other parameters"):
        opt.load_state_dict(sd)
    with pytest.raises(ConfigError, match="not a state_dict of OffloadedAdamW"):
        opt.load_state_dict(torch.optim.AdamW(other.parameters()).state_dict())
    opt.close()


def test_frozen_parameters_get_no_state(disk_dir):
    model = make_model()
    model[0].weight.requires_grad_(False)
    opt = new_opt(model.parameters(), disk_dir)
    assert 0 not in {s.param for t in opt._tiles for s in t.slices}
    run(model, opt, batches(1))
    model[0].weight.requires_grad_(True)
    backward(model, batches(1)[0])
    with pytest.raises(ConfigError, match="requires_grad=False when the optimizer was built"):
        opt.step()
    opt.close()


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_fp16_with_grad_scaler_skips_overflows_and_unscales(disk_dir, max_grad_norm):
    model, ref_model = make_model(torch.float16), make_model(torch.float16)
    opt = new_opt(model.parameters(), disk_dir, lr=1e-2, max_grad_norm=max_grad_norm)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    ref = MasterAdamW(ref_model, lr=1e-2)
    ref_scale, skipped = 2.0**10, 0
    data = batches(5, torch.float16)
    data[2] = (data[2][0] * 6e4, data[2][1])  # overflows fp16: inf/nan gradients
    for batch in data:
        backward(model, batch, scaler=scaler)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        # the reference: the same scaling by hand, the fp32 masters' grads unscaled and clipped
        backward(ref_model, batch, ref_scale)
        grads = [p.grad for p in ref_model.parameters()]
        if all(torch.isfinite(g).all() for g in grads):
            factor = torch.tensor(1.0 / ref_scale)
            if max_grad_norm is not None:
                norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
                total = torch.linalg.vector_norm(torch.stack(norms)) * factor
                factor = factor * torch.clamp(max_grad_norm / (total + 1e-6), max=1.0)
            for m, g in zip(ref.masters, grads, strict=True):
                m.grad = g.float() * factor
            ref.opt.step()
            with torch.no_grad():
                for m, p in zip(ref.masters, ref_model.parameters(), strict=True):
                    p.copy_(m)
        else:
            ref_scale, skipped = ref_scale / 2, skipped + 1
        ref_model.zero_grad()
        assert_same_params(model, ref_model)
        assert scaler.get_scale() == ref_scale
    assert skipped == 1
    assert {float(opt.state[p]["step"]) for p in model.parameters()} == {4.0}
    opt.close()


def test_bad_input_is_refused_at_construction(disk_dir, tmp_path_factory):
    model = make_model()
    with pytest.raises(ConfigError, match=r"20.00 KiB cannot hold .* needs 72.00 KiB, three of"):
        new_opt(model.parameters(), disk_dir, tile_bytes="16KiB", pinned_bytes="20KiB")
    half = make_model(torch.bfloat16)
    half[0].to("meta")
    with pytest.raises(ConfigError, match=r"2 devices \(2 on meta, 4 on cpu\)"):
        new_opt(half.parameters(), disk_dir)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    if shm is not None:  # a store on memory is refused (tmpfs on this machine)
        with pytest.raises(InfinityError, match="tmpfs: memory, not a disk"):
            OffloadedAdamW(model.parameters(), os.path.join(shm, f"infinity-opt-{os.getpid()}"))
    sparse = torch.nn.Embedding(10, 4, sparse=True)
    opt = new_opt(sparse.parameters(), disk_dir, "sparse")
    sparse(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ConfigError, match="sparse"):
        opt.step()
    opt.close()


def test_too_little_disk_is_refused_before_the_first_step(small_fs):
    """64 MiB of disk: a model with 5.8M fp32 parameters (its own masters: exp_avg and
    exp_avg_sq, 8 B/param) needs 92 MB for two slots, 46 MB for one."""
    model = torch.nn.Linear(2400, 2400)
    with pytest.raises(CapacityError, match=r"needs .* more disk .* x 2 slot\(s\).* free"):
        OffloadedAdamW(model.parameters(), os.path.join(small_fs, "opt"), pinned_bytes=0,
                       tile_bytes="4MiB", store_config=small_config(pinned_bytes=0))  # fmt: skip
    assert not [n for n in os.listdir(small_fs) if n.endswith(".bin")]
    opt = OffloadedAdamW(model.parameters(), os.path.join(small_fs, "opt"), pinned_bytes=0,
                         tile_bytes="4MiB", store_config=small_config(pinned_bytes=0),
                         resumable=False)  # fmt: skip
    model(torch.randn(2, 2400)).sum().backward()
    opt.step()
    opt.state_dict()
    opt.close()
