"""Child of test_training_kill.py: trains 3 steps, saves the optimizer's state_dict and the
model's, says "saved", goes on training, says "stepped" after two more steps, and trains
until killed."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from test_training import batches, groups, make_model, new_opt, run  # noqa: E402


def main(store_dir: str, pinned_bytes: str, saved_path: str) -> None:
    model = make_model(torch.bfloat16)
    pinned = int(pinned_bytes) if pinned_bytes.isdigit() else pinned_bytes
    opt = new_opt(groups(model), store_dir, "b", lr=1e-2, tile_bytes="16KiB", pinned_bytes=pinned)
    data = batches(6, torch.bfloat16)
    run(model, opt, data[:3])
    torch.save({"opt": opt.state_dict(), "model": model.state_dict()}, saved_path + ".tmp")
    os.replace(saved_path + ".tmp", saved_path)
    print("saved", flush=True)
    step = 3
    while True:
        run(model, opt, [data[step % len(data)]])
        step += 1
        if step == 5:  # step 4's write-back has landed: step 5 read its tiles again
            print("stepped", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
