"""Child of test_crash.py: a SIGKILL campaign against a store striped over two paths.

``python crash_child.py CONFIG_JSON`` imports everything once, then for each trial forks a
writer that opens the store (the recovery), checks it against the log of what earlier writers
did, says it is ready, and runs random puts, pwrites (in place or not), deletes, flushes,
compacts and gets until it is SIGKILLed at a random instant (some trials are killed while
still opening). A read-only reader process, forked once, reads every key in a loop during the
whole campaign. The last line on stdout is a JSON summary.

Each value written is self-describing: 16 bytes of (key index, version) then ``payload(key,
version, n)``; versions are unique across the campaign, so a read is right exactly when its
bytes equal the value its header names. The log (one JSON object a line, written before the
act, so it survives the kill) holds {"open": trial}, {"op": "put"|"pwrite"|"delete", "k", "v",
"inplace"}, {"pending": state} before a flush or compact and {"done": state} after it, and
{"check": {...}} from each writer's check of what it opened."""

import faulthandler
import json
import mmap
import os
import random
import select
import signal
import struct
import sys
import time
import traceback
from collections import Counter

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from store_helpers import payload, small_config  # noqa: E402

from infinity.errors import InfinityError, IntegrityError  # noqa: E402
from infinity.io import load_aio  # noqa: E402
from infinity.store import TieredStore, UnknownKeyError  # noqa: E402
from infinity.store import manifest as mf  # noqa: E402

KEYS = [f"key{i}" for i in range(8)]
SIZES = [64, 4096, 5000, 20_000, 70_001, 250_000]  # 20 KB and up are striped over both paths
HEADER = struct.Struct("<qq")


# -- values -----------------------------------------------------------------------------------
def value(key: str, version: int, nbytes: int) -> torch.Tensor:
    data = payload(key, version, nbytes)
    data[: HEADER.size] = torch.frombuffer(
        bytearray(HEADER.pack(KEYS.index(key), version)), dtype=torch.uint8
    )
    return data


def version_in(key: str, got: torch.Tensor) -> int | None:
    """The version ``got`` holds if it is exactly a value written for ``key``, else None."""
    if got.dtype != torch.uint8 or got.dim() != 1 or got.numel() < HEADER.size:
        return None
    index, version = HEADER.unpack(got[: HEADER.size].numpy().tobytes())
    if index != KEYS.index(key) or not torch.equal(got, value(key, version, got.numel())):
        return None
    return version


# -- the log ----------------------------------------------------------------------------------
def read_log(path: str) -> list[dict]:
    items = []
    if os.path.exists(path):
        for line in open(path).read().splitlines():
            try:
                items.append(json.loads(line))
            except ValueError:  # a line cut by a kill
                pass
    return items


def expectations(items: list[dict]) -> tuple[list[dict], set[str]]:
    """(the states the store may be in now, the keys that may read as IntegrityError).

    States: the last state whose flush returned, and each one logged as pending after it (a
    flush under way at the kill may have committed). Torn keys: rewritten in place by a killed
    writer after its last flush returned, and not put, pwritten or deleted and flushed since
    (the store lists them in inplace.json and reads them verified)."""
    done, pending = {}, []
    torn, touched, inplace = set(), set(), set()
    for item in items:
        if "open" in item:  # a new writer: the one before was killed
            torn |= inplace
            touched, inplace = set(), set()
        elif "op" in item:
            touched.add(item["k"])
            if item.get("inplace"):
                inplace.add(item["k"])
        elif "pending" in item:
            pending.append(item["pending"])
        elif "done" in item:
            done, pending = item["done"], []
            torn -= touched
            touched, inplace = set(), set()
    return [done, *pending], torn | inplace


class Log:
    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def __call__(self, item: dict) -> None:
        os.write(self.fd, (json.dumps(item) + "\n").encode())  # one write: whole or absent


# -- a writer ---------------------------------------------------------------------------------
def check(store: TieredStore, log_path: str) -> tuple[dict, dict, dict]:
    """Read every key of the store just opened and match it against the log: (the check's
    record, the state found, the key sizes)."""
    allowed, torn_ok = expectations(read_log(log_path))
    found, wrong, torn = {}, [], []
    for key in store.keys():
        try:
            got = store.get(key)
        except IntegrityError as exc:
            if key in torn_ok:
                torn.append(key)
                found[key] = None
            else:
                wrong.append(f"{key}: {exc}")
            continue
        version = version_in(key, got)
        if version is None:
            wrong.append(f"{key}: bytes that no writer wrote")
        found[key] = version
    matches = [
        s
        for s in allowed
        if set(s) == set(found) and all(v is None or s[k] == v for k, v in found.items())
    ]
    state = (
        {k: (v if v is not None else matches[0][k]) for k, v in found.items()} if matches else {}
    )
    record = {
        "ok": not wrong and bool(matches),
        "keys": len(found),
        "torn": torn,
        "wrong": wrong,
        "found": found if not matches else None,
        "allowed": allowed if not matches else None,
    }
    sizes = {k: store.entry(k).nbytes for k in found}
    return record, state, sizes


def writer(args: dict, trial: int, ready_fd: int, phase: mmap.mmap) -> None:
    rng = random.Random(args["seed"] * 1_000_003 + trial)
    log = Log(args["log"])
    log({"open": trial})
    mark(phase, "open")
    config = small_config(pinned_bytes=1 << 20, verify_checksums=trial % 2 == 0)
    store = TieredStore.open(args["paths"], config)
    mark(phase, "check")
    record, state, sizes = check(store, args["log"])
    log({"check": {"trial": trial, **record}})
    if not record["ok"]:
        os._exit(3)
    if ready_fd is None:  # the final check only
        store.close()
        return
    os.write(ready_fd, b"r")
    torn = set(record["torn"])  # read as IntegrityError until written again
    counter = 0

    def fresh() -> int:
        nonlocal counter
        counter += 1
        return trial * 1_000_000 + counter

    while True:
        roll, key = rng.random(), rng.choice(KEYS)
        if roll < 0.35:
            version, nbytes = fresh(), rng.choice(SIZES)
            log({"op": "put", "k": key, "v": version})
            mark(phase, "put")
            store.put(key, value(key, version, nbytes), tier="cpu" if roll < 0.03 else "nvme")
            state[key], sizes[key] = version, nbytes
            torn.discard(key)
        elif roll < 0.55:
            chosen, tensors, new = rng.sample(KEYS, rng.randint(1, 3)), [], {}
            for k in chosen:
                version = fresh()
                nbytes = sizes[k] if k in state and rng.random() < 0.8 else rng.choice(SIZES)
                log({"op": "pwrite", "k": k, "v": version, "inplace": sizes.get(k) == nbytes})
                tensors.append(value(k, version, nbytes))
                new[k] = (version, nbytes)
            mark(phase, "pwrite")
            store.pwrite(chosen, tensors).result()
            for k, (version, nbytes) in new.items():
                state[k], sizes[k] = version, nbytes
            torn -= set(new)
        elif roll < 0.62 and state:
            key = rng.choice(sorted(state))
            log({"op": "delete", "k": key})
            mark(phase, "delete")
            store.delete(key)
            del state[key], sizes[key]
            torn.discard(key)
        elif roll < 0.84:
            log({"pending": dict(state)})
            mark(phase, "flush" if roll < 0.80 else "compact")
            store.flush() if roll < 0.80 else store.compact()
            log({"done": dict(state)})
        elif set(state) - torn:
            key = rng.choice(sorted(set(state) - torn))
            mark(phase, "get")
            got = store.get(key)
            if version_in(key, got) != state[key]:
                log({"check": {"trial": trial, "ok": False, "wrong": [f"{key}: own read"]}})
                os._exit(3)


def mark(phase: mmap.mmap, name: str) -> None:
    phase[:16] = name.encode().ljust(16)


# -- the reader -------------------------------------------------------------------------------
def reader(args: dict) -> None:
    """Read every key in a loop until SIGTERM; write the tally to args["reader_log"]."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    tally = Counter()
    wrong, other = [], []
    store = None
    while not stop:
        if store is None:
            try:
                store = TieredStore.open(
                    args["paths"], small_config(verify_checksums=False), readonly=True
                )
            except InfinityError:  # not created yet
                time.sleep(0.05)
                continue
        for key in KEYS:
            try:
                got = store.get(key)
            except UnknownKeyError:
                tally["absent"] += 1
                continue
            except IntegrityError as exc:
                entry = store._entries.get(key)  # the entry just read (no refresh since)
                if entry is not None and entry.suspect:
                    tally["torn"] += 1  # listed in inplace.json: the truth about torn bytes
                else:
                    wrong.append(f"{key}: {exc}")
                continue
            except InfinityError as exc:
                tally["busy"] += 1  # a writer committing faster than the read: said so
                other.append(str(exc)[:200])
                continue
            if version_in(key, got) is None:
                wrong.append(f"{key}: bytes that no writer wrote ({got.numel()} bytes)")
            else:
                tally["reads"] += 1
    if store is not None:
        store.close()
    with open(args["reader_log"], "w") as f:
        json.dump({"tally": tally, "wrong": wrong[:20], "other": other[:20]}, f)


# -- the campaign -----------------------------------------------------------------------------
def fork(target, *args) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            target(*args)
        except BaseException:  # noqa: BLE001
            trace = traceback.format_exc()[-3000:]
            Log(args[0]["log"])({"check": {"ok": False, "wrong": [f"crashed: {trace}"]}})
            code = 4
        finally:
            os._exit(code)
    return pid


def campaign(args: dict) -> dict:
    load_aio()  # once, before the forks
    rng = random.Random(args["seed"])
    phase = mmap.mmap(-1, 16)
    kills, failures, seconds = Counter(), [], []
    reader_pid = None
    start = time.monotonic()
    for trial in range(args["trials"]):
        began = time.monotonic()
        read_end, write_end = os.pipe()
        mark(phase, "fork")
        pid = fork(writer, args, trial, write_end, phase)
        os.close(write_end)
        early = rng.random() < args["early"]
        if not early:
            ready, _, _ = select.select([read_end], [], [], 120)
            if not ready or not os.read(read_end, 1):
                failures.append(f"trial {trial}: the writer never got ready")
        time.sleep(rng.uniform(0, args["early_s"] if early else args["run_s"]))
        kills[phase[:16].decode().strip()] += 1
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            failures.append(f"trial {trial}: the writer exited by itself ({status})")
        os.close(read_end)
        seconds.append(time.monotonic() - began)
        if reader_pid is None and os.path.exists(os.path.join(args["paths"][0], mf.MANIFEST)):
            reader_pid = fork(reader, args)
    final = fork(writer, args, args["trials"], None, phase)
    _, status = os.waitpid(final, 0)
    if status != 0:
        failures.append(f"the final check failed ({status})")
    if reader_pid is not None:
        os.kill(reader_pid, signal.SIGTERM)
        _, status = os.waitpid(reader_pid, 0)
        if status != 0:
            failures.append(f"the reader failed ({status})")
    return {
        "kills": kills,
        "failures": failures,
        "seconds": time.monotonic() - start,
        "trial_s": sorted(seconds)[len(seconds) // 2] if seconds else 0,
    }


if __name__ == "__main__":
    faulthandler.enable()  # a crash of any process of the campaign shows its Python stack
    print(json.dumps(campaign(json.loads(sys.argv[1]))))
