"""TieredStore.pwrite: in-place rewrites that do not grow the files, whole values for racing
readers, and after a SIGKILL each rewritten key old, new or a named IntegrityError."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from pwrite_crash_child import KEYS, SIZE
from store_helpers import payload, small_config

from infinity import IntegrityError
from infinity.store import TieredStore
from infinity.store import manifest as mf

HERE = os.path.dirname(os.path.abspath(__file__))


def _data_bytes(path):
    return os.path.getsize(os.path.join(path, "data.bin"))


def test_pwrite_rewrites_in_place_and_files_do_not_grow(disk_dir):
    path = os.path.join(disk_dir, "s")
    with TieredStore.open(path, small_config()) as s:
        s.pwrite(["a", "b"], [torch.ones(50_000), torch.arange(30_000)]).result()
        s.flush()
        extents = {k: mf.Entry.from_record(k, r, 1).extents for k, r in _records(path).items()}
        size = _data_bytes(path)
        for step in range(5):
            a, b = torch.full((50_000,), float(step)), torch.arange(30_000) * step
            assert s.pwrite(["a", "b"], [a, b]).result() == 2
            s.flush()
            assert _data_bytes(path) == size
            assert torch.equal(s.get("a"), a) and torch.equal(s.get("b"), b)
        now = {k: mf.Entry.from_record(k, r, 1).extents for k, r in _records(path).items()}
        assert now == extents, "a same-size pwrite moved the key"
        assert s.entry("a").version == 6
        s.pwrite(["a"], [torch.ones(10, dtype=torch.float64)]).result()  # another size: new extents
        s.pwrite(["c"], [torch.zeros(3, 3)]).result()
        assert torch.equal(s.get("a"), torch.ones(10, dtype=torch.float64))
        same_bytes = torch.arange(12, dtype=torch.int32).reshape(3, 4)  # same nbytes, new shape
        s.pwrite(["c"], [same_bytes.view(torch.float32)]).result()
        assert torch.equal(s.get("c").view(torch.int32), same_bytes)
    with TieredStore.open(path, small_config(), readonly=True) as r:
        assert torch.equal(r.get("b"), torch.arange(30_000) * 4)
        assert r.entry("c").shape == (3, 4)
    assert not os.path.exists(os.path.join(path, mf.INPLACE)), "a settled record left behind"


def _records(path):
    return mf.read_manifest(path)["entries"]


def test_pwrite_errors_leave_nothing_half_done(disk_dir):
    path = os.path.join(disk_dir, "s")
    with TieredStore.open(path, small_config()) as s:
        with pytest.raises(ValueError, match="one tensor per key"):
            s.pwrite(["a", "b"], [torch.ones(3)])
        with pytest.raises(ValueError, match="no plain bytes"):
            s.pwrite(["a"], [torch.empty(3, device="meta")])
        assert len(s) == 0


@pytest.mark.parametrize("verify", [True, False])
def test_get_racing_an_in_place_pwrite_is_old_or_new(disk_dir, verify):
    path = os.path.join(disk_dir, "s")
    size = 200_000
    values = [payload("k", v, size) for v in range(60)]
    stop, errors, reads = threading.Event(), [], [0]
    s = TieredStore.open(path, small_config(verify_checksums=verify))
    s.pwrite(["k"], [values[0]]).result()
    s.flush()
    reader = TieredStore.open(path, small_config(verify_checksums=verify), readonly=True)

    def write():
        for v in range(1, 60):
            s.pwrite(["k"], [values[v]]).result()
            if v % 3 == 0:
                s.flush()
        s.flush()
        stop.set()

    def read(store):
        while not stop.is_set():
            try:
                got = store.get("k")
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))
                continue
            reads[0] += 1
            if not any(torch.equal(got, want) for want in values):
                errors.append("a value no pwrite wrote")

    threads = [threading.Thread(target=write)]
    threads += [threading.Thread(target=read, args=(st,)) for st in (s, s, reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert torch.equal(reader.get("k"), values[59])
    reader.close()
    s.close()
    assert errors == [] and reads[0] > 5


def _log(log_path):
    items = []
    for line in open(log_path).read().splitlines():
        try:
            items.append(json.loads(line))
        except ValueError:  # torn by the kill
            pass
    return items


@pytest.mark.slow
@pytest.mark.parametrize("verify", [True, False])
def test_sigkill_during_in_place_rewrites(disk_dir, verify):
    store_dir = os.path.join(disk_dir, f"store-{verify}")
    log_path = os.path.join(disk_dir, f"log-{verify}")
    rng = random.Random(99)
    torn = 0
    for round_ in range(6):
        proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "pwrite_crash_child.py"), store_dir, log_path,
             str(round_)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        before = open(log_path).read().count('"done"') if os.path.exists(log_path) else 0
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(log_path) and open(log_path).read().count('"done"') > before:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()

        items = _log(log_path)
        last = max(i for i, item in enumerate(items) if "done" in item)
        flushed = items[last]["done"]
        maybe = {}  # key -> versions it may hold beyond the flushed one
        for item in items[last + 1 :]:
            for k, v in item.get("writing", {}).items():
                maybe.setdefault(k, set()).add(v)
        config = small_config(verify_checksums=verify)
        actual = {}
        with TieredStore.open(store_dir, config) as s:
            for key in KEYS:
                allowed = {flushed[key]} | maybe.get(key, set())
                try:
                    got = s.get(key)
                except IntegrityError as exc:
                    assert key in maybe and repr(key) in str(exc), f"{key}: {exc}"
                    torn += 1
                    s.put(key, payload(key, flushed[key], SIZE))  # repaired, as a user would
                    actual[key] = flushed[key]
                    continue
                ok = [v for v in allowed if torch.equal(got, payload(key, v, SIZE))]
                assert ok, f"{key} holds none of versions {sorted(allowed)}: mixed bytes"
                actual[key] = ok[0]
        with open(log_path, "a") as log:  # the next child goes on from what the store holds
            log.write("\n" + json.dumps({"done": actual}) + "\n")  # after any torn line
    assert os.path.getsize(os.path.join(store_dir, "data.bin")) <= 2 * len(KEYS) * 4096 * (
        -(-SIZE // 4096)
    ), "the data file grew: rewrites were not in place"
    print(f"torn keys detected: {torn}")


def test_a_reader_does_not_wait_for_keys_a_crashed_writer_left_listed(disk_dir):
    """inplace.json left by a writer killed mid-rewrite lists keys nobody writes any more: with
    a new writer alive, a reader reads them at once (verified), not after REWRITE_WAIT_S."""
    path = os.path.join(disk_dir, "s")
    with TieredStore.open(path, small_config()) as s:
        s.put("k", payload("k", 1, 100_000))
    generation = mf.read_manifest(path)["generation"]
    mf.write_inplace(path, generation, {"k"})  # what the killed writer left
    with TieredStore.open(path, small_config()) as writer:  # alive, rewriting nothing
        assert mf.read_inplace(path, generation) == ({"k"}, {"k"})  # settled: nobody writes it
        with TieredStore.open(path, small_config(), readonly=True) as reader:
            start = time.monotonic()
            assert torch.equal(reader.get("k"), payload("k", 1, 100_000))
            assert time.monotonic() - start < 5
        writer.pwrite(["k"], [payload("k", 2, 100_000)]).result()
        assert mf.read_inplace(path, generation) == ({"k"}, set())  # rewritten by this one
        writer.flush()
    assert mf.read_inplace(path, generation + 1) == (set(), set())
    with TieredStore.open(path, small_config(), readonly=True) as reader:
        assert torch.equal(reader.get("k"), payload("k", 2, 100_000))
