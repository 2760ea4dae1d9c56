"""The randomized fault campaign (benchmarks/fault_campaign.py): a few faults of a fixed
seed in the suite, and its checks shown to catch what they are for."""

from __future__ import annotations

import json
import shutil
import sys

import h5py
import numpy as np
import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import fault_campaign  # noqa: E402
from fault_campaign import Campaign, Outcome  # noqa: E402

# Every kind of fault once, in turn (the long campaign draws them at random).
CI_KINDS = ",".join(fault_campaign.KINDS)
N_CI = len(fault_campaign.KINDS)


@pytest.mark.slow
def test_a_small_campaign_keeps_every_invariant(tmp_path):
    out = tmp_path / "summary.json"
    code = fault_campaign.main(["--faults", str(N_CI), "--seed", "7", "--jobs", "2", "--cycle",
                                "--kinds", CI_KINDS, "--work", str(tmp_path / "work"),
                                "--out", str(out)])
    summary = json.loads(out.read_text())
    assert summary["failures"] == [] and code == 0
    assert summary["seed"] == 7 and summary["faults"] == N_CI and summary["ran"] == N_CI
    assert summary["lost_or_wrong_rows"] == 0 and all(summary["kinds"].values())


def test_the_checks_catch_what_they_are_for(tmp_path):
    c = Campaign(tmp_path, 0, 60)
    crash = Outcome([], 1, "", "Traceback (most recent call last):\n  ...\nOSError: x\n")
    assert any("traceback" in v for v in c.clean(crash, "x", ok=(0, 1)))
    assert any("signal" in v for v in c.clean(Outcome([], 139, "", ""), "x"))
    assert any("signal" in v for v in c.clean(Outcome([], -11, "", ""), "x"))
    assert c.clean(Outcome([], -9, "", "", signalled=True), "x") == []  # our own kill
    assert any("more than one line" in v for v in c.clean(Outcome([], 2, "", "a\nb\n"), "x",
                                                          ok=(2,)))
    assert any("hang" in v for v in c.clean(Outcome([], -9, "", "", hang=True), "x"))
    # A wrong row is found, a right one is not.
    ref = tmp_path / "ref"
    ref.mkdir()
    with h5py.File(ref / "results.h5", "w") as f:
        f["images/status"] = np.ones(3, np.uint8)
        f["gradcam/layer4"] = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
    shutil.copytree(ref, tmp_path / "run")
    assert c.compare(tmp_path / "run" / "results.h5", ref) == []
    with h5py.File(tmp_path / "run" / "results.h5", "r+") as f:
        f["gradcam/layer4"][1, 0, 0] = 99
    assert c.compare(tmp_path / "run" / "results.h5", ref) == [
        "rows: wrong rows in gradcam/layer4"]
    assert c.compare(tmp_path / "run" / "results.h5", ref, rows=[0, 2]) == []
