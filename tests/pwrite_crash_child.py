"""Child of test_store_pwrite.py: rewrites keys in place and flushes in a loop until killed.

Before each round of pwrites it logs {"writing": {key: version}} and after each flush returns
{"done": {key: version}} (fsync'd), so the parent knows which keys may be old, new or torn."""

import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(__file__))
from store_helpers import payload, small_config  # noqa: E402

from infinity.store import TieredStore  # noqa: E402

KEYS = [f"key{i}" for i in range(6)]
SIZE = 300_000  # several bounce chunks per key: a kill can land inside one key's write


def record(log, item) -> None:
    log.write(json.dumps(item) + "\n")
    log.flush()
    os.fsync(log.fileno())


def main(store_dir: str, log_path: str, seed: int) -> None:
    rng = random.Random(seed)
    store = TieredStore.open(store_dir, small_config())
    log = open(log_path, "a")
    versions = {}
    for line in open(log_path).read().splitlines():
        try:
            versions = json.loads(line).get("done", versions)
        except ValueError:  # a line torn by a kill
            pass
    if not versions:
        store.pwrite(KEYS, [payload(k, 1, SIZE) for k in KEYS]).result()
        store.flush()
        versions = {k: 1 for k in KEYS}
        record(log, {"done": versions})
    while True:
        chosen = rng.sample(KEYS, rng.randint(1, 4))
        new = {k: versions[k] + 1 for k in chosen}
        record(log, {"writing": new})
        store.pwrite(chosen, [payload(k, v, SIZE) for k, v in new.items()]).result()
        versions.update(new)
        store.flush()
        record(log, {"done": dict(versions)})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
