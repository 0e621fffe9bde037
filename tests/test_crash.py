"""kill -9 in the middle of writes: the store reopens and loses nothing flush() returned for."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from crash_child import size_of
from store_helpers import payload, small_config

from infinity.store import TieredStore

HERE = os.path.dirname(os.path.abspath(__file__))


def allowed_states(log_path: str) -> list[dict[str, int]]:
    """The last state whose flush returned, and the one being flushed after it (if any)."""
    items = []
    for line in open(log_path).read().splitlines():
        try:
            items.append(json.loads(line))
        except ValueError:  # a line torn by the kill
            pass
    done = [i for i, item in enumerate(items) if "done" in item]
    assert done, "no flush completed"
    states = [items[done[-1]]["done"]]
    states += [item["pending"] for item in items[done[-1] + 1 :] if "pending" in item]
    return states


@pytest.mark.slow
def test_sigkill_during_writes_loses_nothing_flushed(disk_dir):
    store_dir = os.path.join(disk_dir, "store")
    log_path = os.path.join(disk_dir, "flushed.log")
    rng = random.Random(1234)
    kills = 0
    for round_ in range(5):
        proc = subprocess.Popen(
            [
                sys.executable,
                os.path.join(HERE, "crash_child.py"),
                store_dir,
                log_path,
                str(round_),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        before = _count_done(log_path)
        deadline = time.time() + 240
        while time.time() < deadline:  # wait until this child has committed at least once
            if _count_done(log_path) > before:
                break
            if proc.poll() is not None:
                pytest.fail(f"child died: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        time.sleep(rng.uniform(0.05, 1.0))  # somewhere in the middle of puts, flushes, commits
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1

        allowed = allowed_states(log_path)
        with TieredStore.open(store_dir, small_config()) as store:
            state = {k: store.entry(k).version for k in store.keys()}
            assert state in allowed, f"state {state} is neither of {allowed}: a mix"
            for key, version in state.items():
                got = store.get(key)  # checksums are verified: torn data would raise
                assert torch.equal(got, payload(key, version, size_of(key))), key
    assert kills == 5


def _count_done(log_path: str) -> int:
    if not os.path.exists(log_path):
        return 0
    return open(log_path).read().count('"done"')
