"""Child of test_training_kill.py: trains a small bf16 model to step TOTAL, resuming from
CKPT when it exists; every EVERY steps it saves the optimizer's and the model's state_dict to
CKPT (a temporary file, fsynced, renamed). Prints "resumed N", "step N" after each step, and
"done"; "refused: ..." and exit 3 when the checkpoint cannot be resumed (an InfinityError at
load or in the first step after it)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from test_training import batches, groups, make_model, new_opt, run  # noqa: E402

from infinity.errors import InfinityError  # noqa: E402


def save(payload: dict, path: str) -> None:
    with open(path + ".tmp", "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(store_dir, pinned_bytes, ckpt, total, every, resumable) -> None:
    total, every = int(total), int(every)
    pinned = int(pinned_bytes) if pinned_bytes.isdigit() else pinned_bytes
    model = make_model(torch.bfloat16)
    opt = new_opt(groups(model), store_dir, "b", lr=1e-2, tile_bytes="16KiB",
                  pinned_bytes=pinned, resumable=resumable == "1")  # fmt: skip
    data = batches(8, torch.bfloat16)
    step = 0
    try:
        if os.path.exists(ckpt):
            saved = torch.load(ckpt, weights_only=True)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            step = saved["step"]
        print("resumed", step, flush=True)
        if step >= total:
            opt.close()
            print("done", flush=True)
            return
        run(model, opt, [data[step % len(data)]])
    except InfinityError as exc:
        print(f"refused: {exc}", flush=True)
        sys.exit(3)
    step += 1
    while True:
        if step % every == 0:
            save({"opt": opt.state_dict(), "model": model.state_dict(), "step": step}, ckpt)
        print("step", step, flush=True)
        if step >= total:
            break
        run(model, opt, [data[step % len(data)]])
        step += 1
    opt.close()
    print("done", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
