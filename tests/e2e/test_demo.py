"""`hushgate demo`, the README's main-job command, runs end to end and cleans up after itself."""

from __future__ import annotations

import subprocess
import sys

from guard.sim.topology import _netns_list


def test_demo_walks_through_every_step_and_leaves_nothing_behind(kernel_world: None) -> None:
    before = set(_netns_list())
    proc = subprocess.run([sys.executable, "-m", "guard.cli", "demo"], capture_output=True,
                          text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for step in ("Step 1/5", "Step 2/5", "Step 3/5", "Step 4/5", "Step 5/5"):
        assert step in out
    assert "the demo passed" in out
    assert "(identical)" in out and "received 0 bytes" in out
    assert set(_netns_list()) <= before  # no namespace left behind
