"""kill -9 at random instants of a writer, with a reader racing it: nothing flush() returned for
is lost, and no read (the reopening writer's or the racing reader's) returns bytes that were
not written for that key. The campaign runs in crash_child.py; see its docstring."""

import json
import os
import subprocess
import sys

import pytest
from crash_child import expectations, read_log
from store_helpers import small_config

from infinity.store import TieredStore

HERE = os.path.dirname(os.path.abspath(__file__))
TRIALS = int(os.environ.get("INFINITY_CRASH_TRIALS", 420))  # issue 19: 420; ~0.6 s each on 2 cores


@pytest.mark.slow
def test_sigkill_campaign_loses_nothing_flushed(disk_dir):
    paths = [os.path.join(disk_dir, "a"), os.path.join(disk_dir, "b")]
    args = {
        "paths": paths,
        "log": os.path.join(disk_dir, "campaign.log"),
        "reader_log": os.path.join(disk_dir, "reader.json"),
        "trials": TRIALS,
        "seed": 19,
        "run_s": 0.6,  # a kill this long at most after the writer is ready
        "early": 0.1,  # the share of kills while the writer is still opening and checking
        "early_s": 0.2,
    }
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "crash_child.py"), json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    items = read_log(args["log"])
    checks = [item["check"] for item in items if "check" in item]
    bad = [c for c in checks if not c["ok"]]
    assert bad == [], bad[:3]
    assert summary["failures"] == [], (summary["failures"], proc.stderr[-5000:])
    assert sum(summary["kills"].values()) == TRIALS
    assert len(checks) >= TRIALS * 0.8  # the early kills may land before a writer's check
    commits = sum("done" in item for item in items)
    assert commits >= TRIALS, f"only {commits} flushes returned in {TRIALS} trials"
    for phase in ("put", "pwrite", "flush"):  # the kills landed everywhere
        assert summary["kills"].get(phase, 0) >= TRIALS // 20, summary["kills"]

    with open(args["reader_log"]) as f:
        reader = json.load(f)
    assert reader["wrong"] == [], reader["wrong"]
    assert reader["tally"].get("reads", 0) >= 10 * TRIALS, reader["tally"]

    _, torn = expectations(items)
    with TieredStore.open(paths, small_config(), readonly=True) as store:
        assert set(store.fsck()) <= torn  # the only damage: keys torn by in-place writes
    print(
        f"{TRIALS} kills in {summary['seconds']:.0f} s ({summary['trial_s']:.2f} s median): "
        f"{dict(summary['kills'])}; {commits} flushes; reader {reader['tally']}; torn keys seen "
        f"{sum(len(c.get('torn', [])) for c in checks)}"
    )
