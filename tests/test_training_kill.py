"""kill -9 of a training process at random moments (mid-step, mid-flush, while it saves its
checkpoint), then a resume from the last checkpoint it saved, again and again: the run ends on
the uninterrupted run's parameters and states, bit for bit. With resumable=False (one slot
rewritten in place) a resume is exact or refused loudly, never silently wrong."""

import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_training import batches, groups, make_model, new_opt, run, stored_states

from infinity.errors import InfinityError, IntegrityError

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "training_kill_child.py")
KILLS = int(os.environ.get("INFINITY_TRAIN_KILLS", "12"))
TOTAL = 24  # steps of the run; a checkpoint every 2


def start(disk_dir, pinned_bytes, total, every, resumable):
    ckpt = os.path.join(disk_dir, "ckpt.pt")
    args = [disk_dir, str(pinned_bytes), ckpt, str(total), str(every), "1" if resumable else "0"]
    return subprocess.Popen([sys.executable, CHILD, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def next_line(proc, timeout_s: float) -> str | None:
    """The child's next line; None on timeout; "" when it exited."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    return proc.stdout.readline() if ready else None


def wait_for(proc, prefix: str, timeout_s: float = 120) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        line = next_line(proc, 1.0)
        if line == "":
            pytest.fail(f"child exited ({proc.wait()}): {proc.stderr.read()[-3000:]}")
        if line and line.startswith(prefix):
            return line.strip()
    pytest.fail(f"child printed no {prefix!r} in {timeout_s} s")


def uninterrupted(disk_dir, pinned_bytes):
    model = make_model(torch.bfloat16)
    opt = new_opt(groups(model), disk_dir, "a", lr=1e-2, tile_bytes="16KiB",
                  pinned_bytes=pinned_bytes)  # fmt: skip
    data = batches(8, torch.bfloat16)
    run(model, opt, [data[s % len(data)] for s in range(TOTAL)])
    states = stored_states(opt)
    opt.close()
    return model, states


def finished_run(disk_dir, pinned_bytes, resumable):
    """The child's model and states after it reached TOTAL."""
    model = make_model(torch.bfloat16, seed=7)
    saved = torch.load(os.path.join(disk_dir, "ckpt.pt"), weights_only=True)
    assert saved["step"] == TOTAL
    model.load_state_dict(saved["model"])
    opt = new_opt(groups(model), disk_dir, "b", lr=1e-2, tile_bytes="16KiB",
                  pinned_bytes=pinned_bytes, resumable=resumable)  # fmt: skip
    opt.load_state_dict(saved["opt"])
    states = stored_states(opt)
    opt.close()
    return model, states


@pytest.mark.parametrize(
    "resumable, pinned_bytes", [(True, 0), (True, "1MiB"), (False, 0)],
    ids=["two-slots-streamed", "two-slots-pinned", "one-slot-streamed"],
)  # fmt: skip
def test_kills_at_random_moments_end_on_the_uninterrupted_run(disk_dir, resumable, pinned_bytes):
    rng = random.Random(f"{resumable}{pinned_bytes}")
    kills = refused = 0
    step_s = 0.05  # learnt from the child's pace
    while True:
        proc = start(disk_dir, pinned_bytes, TOTAL, 2, resumable)
        try:
            first = wait_for(proc, "resumed")
            began = time.time()
            at = int(first.split()[1])
            # within the next few steps: in a step, a state_dict, a save, or the resume itself
            deadline = began + rng.uniform(0, 4 * step_s) if kills < KILLS else None
            status = None
            while status is None:
                left = None if deadline is None else deadline - time.time()
                if left is not None and left <= 0:
                    proc.send_signal(signal.SIGKILL)
                    kills += 1
                    status = "killed"
                    break
                line = next_line(proc, 1.0 if left is None else min(left, 1.0))
                if line == "":
                    status = {0: "done", 3: "refused"}.get(proc.wait(), "crashed")
                elif line and line.startswith("step"):
                    done = int(line.split()[1]) - at
                    step_s = 0.7 * step_s + 0.3 * (time.time() - began) / max(done, 1)
        finally:
            proc.kill()
            proc.wait()
        err = proc.stderr.read()
        assert status != "crashed", err[-3000:]
        if status == "done":
            break
        if status == "refused":
            assert not resumable, f"a two-slot checkpoint was refused: {err[-2000:]}"
            refused += 1
            os.remove(os.path.join(disk_dir, "ckpt.pt"))  # start over, from scratch
            shutil.rmtree(os.path.join(disk_dir, "b"))
    assert kills == KILLS, f"the run ended after {kills} of {KILLS} kills (steps too fast?)"
    model, states = finished_run(disk_dir, pinned_bytes, resumable)
    want_model, want_states = uninterrupted(disk_dir, pinned_bytes)
    for (name, p), q in zip(model.named_parameters(), want_model.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert states.keys() == want_states.keys()
    for key in want_states:
        assert torch.equal(states[key], want_states[key]), key


def test_one_slot_rewritten_after_the_checkpoint_fails_loudly(disk_dir):
    """resumable=False, checkpoint at step 3, killed after step 5: steps 4 and 5 rewrote the
    streamed tiles in place, so the resume fails (in the first step), never silently wrong."""
    proc = start(disk_dir, 0, 10**6, 3, resumable=False)
    try:
        wait_for(proc, "step 5")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    saved = torch.load(os.path.join(disk_dir, "ckpt.pt"), weights_only=True)
    assert saved["step"] == 3
    model = make_model(torch.bfloat16, seed=7)
    model.load_state_dict(saved["model"])
    opt = new_opt(groups(model), disk_dir, "b", lr=1e-2, tile_bytes="16KiB", pinned_bytes=0,
                  resumable=False)  # fmt: skip
    opt.load_state_dict(saved["opt"])  # its versions are the manifest's: the damage is later
    with pytest.raises(IntegrityError, match="cannot be resumed"):
        run(model, opt, batches(1, torch.bfloat16))
    with pytest.raises(InfinityError):  # no further step on that
        opt.step()
    opt.close()
