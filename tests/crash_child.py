"""Child of test_crash.py: puts and flushes in a loop until it is killed.

Before each flush it logs {"pending": {key: version}} and after it returns {"done": ...} (fsync'd),
so the parent knows the two states the store may be in after a SIGKILL."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from store_helpers import payload, small_config  # noqa: E402

from infinity.store import TieredStore  # noqa: E402

KEYS = [f"key{i}" for i in range(8)]


def size_of(key: str) -> int:
    return 3000 + 70_001 * KEYS.index(key)  # up to ~490 KB, several bounce chunks


def main(store_dir: str, log_path: str, seed: int) -> None:
    import random

    rng = random.Random(seed)
    store = TieredStore.open(store_dir, small_config())
    log = open(log_path, "a")
    while True:
        for _ in range(rng.randint(1, 4)):
            key = rng.choice(KEYS)
            if key in store and rng.random() < 0.15:
                store.delete(key)
                continue
            version = store.entry(key).version + 1 if key in store else 1
            store.put(key, payload(key, version, size_of(key)))
            assert store.entry(key).version == version
        state = {k: store.entry(k).version for k in store.keys()}
        record(log, {"pending": state})
        store.flush()
        record(log, {"done": state})


def record(log, item) -> None:
    log.write(json.dumps(item) + "\n")
    log.flush()
    os.fsync(log.fileno())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
