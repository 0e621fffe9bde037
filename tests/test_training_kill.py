"""kill -9 of a training process after its last state_dict: a resume from that state_dict is
bit for bit the uninterrupted run when the states never left RAM since (all kept pinned), and
fails loudly, never silently wrong, when later steps rewrote them in place on disk."""

import os
import random
import select
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_training import batches, groups, make_model, new_opt, run, stored_states

from infinity.errors import InfinityError, IntegrityError

HERE = os.path.dirname(os.path.abspath(__file__))


def wait_for_line(proc, want: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        line = proc.stdout.readline() if ready else None
        if line == "":
            pytest.fail(f"child died: {proc.stderr.read()[-2000:]}")
        if line is not None and line.strip() == want:
            return
    pytest.fail(f"child printed no {want!r} in {timeout_s} s")


def train_and_kill(disk_dir, pinned_bytes) -> dict:
    saved = os.path.join(disk_dir, "saved.pt")
    child = os.path.join(HERE, "training_kill_child.py")
    proc = subprocess.Popen([sys.executable, child, disk_dir, str(pinned_bytes), saved],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for_line(proc, "stepped", timeout_s=120)
        time.sleep(random.Random(0).uniform(0, 0.05))  # somewhere in a later step
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    return torch.load(saved, weights_only=True)


def resumed(disk_dir, pinned_bytes, saved):
    model = make_model(torch.bfloat16, seed=7)
    model.load_state_dict(saved["model"])
    kw = dict(lr=1e-2, tile_bytes="16KiB", pinned_bytes=pinned_bytes)
    opt = new_opt(groups(model), disk_dir, "b", **kw)
    opt.load_state_dict(saved["opt"])
    return model, opt


def test_kill_after_state_dict_with_states_in_ram_resumes_exactly(disk_dir):
    saved = train_and_kill(disk_dir, "1MiB")
    model, opt = resumed(disk_dir, "1MiB", saved)
    data = batches(6, torch.bfloat16)
    run(model, opt, data[3:])
    got = stored_states(opt)
    opt.close()
    straight = make_model(torch.bfloat16)
    ref = new_opt(groups(straight), disk_dir, "a", lr=1e-2, tile_bytes="16KiB")
    run(straight, ref, data)
    want = stored_states(ref)
    ref.close()
    for (name, p), q in zip(model.named_parameters(), straight.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_kill_after_state_dict_with_states_rewritten_on_disk_fails_loudly(disk_dir):
    saved = train_and_kill(disk_dir, 0)
    model, opt = resumed(disk_dir, 0, saved)
    with pytest.raises(IntegrityError, match="killed during a step after its last state_dict"):
        run(model, opt, batches(1, torch.bfloat16))
    with pytest.raises(InfinityError, match="failed midway"):  # no further step on that
        opt.step()
    opt.close()
