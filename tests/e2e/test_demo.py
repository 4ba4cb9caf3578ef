"""`hushgate demo`, the README's main-job command, runs end to end and cleans up after itself."""

from __future__ import annotations

import re
import subprocess
import sys

from hushsim.topology import _netns_list
from tests.e2e.guardkit import REPO


def test_demo_walks_through_every_step_and_leaves_nothing_behind(kernel_world: None) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "guard.tools.cli", "demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    for step in ("Step 1/5", "Step 2/5", "Step 3/5", "Step 4/5", "Step 5/5"):
        assert step in out
    assert "the demo passed" in out
    assert "(identical)" in out and "received 0 bytes" in out
    # the demo's namespaces are named after its PID (other tests may run their own meanwhile)
    leftovers = [ns for ns in _netns_list() if ns.startswith(f"hg{proc.pid}x")]
    assert leftovers == []
    # its parting advice names the commands the packaged service runs, with the packaged config
    unit = (REPO / "packaging/systemd/hushgate.service").read_text()
    advised = re.findall(r"`(hushgate (?:firewall apply|run) [^`]*)`", out)
    assert len(advised) == 2, out
    for command in advised:
        assert f"/opt/hushgate/bin/{command}\n" in unit, command
