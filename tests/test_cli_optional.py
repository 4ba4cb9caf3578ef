"""Commands that need optional parts (the simulator and dpkt, left out of the OpenWrt package)
say in one line what is missing and how to get it, instead of a traceback (issue 17)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Runs the CLI with the named modules made unimportable, as on a router without them.
RUN = ("import sys\n"
       "for m in sys.argv[1].split(','): sys.modules[m] = None\n"
       "sys.argv = ['hushgate'] + sys.argv[2:]\n"
       "from guard.tools.cli import main\n"
       "main()\n")


def hushgate_without(missing: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN, missing, *args], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize(("missing", "args", "says"), [
    ("dpkt", ("analyze",), "opkg install python3-dpkt"),
    ("dpkt", ("analyze", "--json"), "hushgate analyze FILE.pcap"),
    ("dpkt", ("demo",), "pip install dpkt"),
    ("hushsim", ("demo",), "the simulated home (hushsim)"),
    ("hushsim,dpkt", ("demo",), "the simulated home (hushsim)"),
])
def test_a_missing_optional_part_is_one_line(missing: str, args: tuple[str, ...],
                                             says: str) -> None:
    res = hushgate_without(missing, *args)
    assert res.returncode == 1, res
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hushgate: "), res.stderr
    assert says in lines[0], lines[0]
    assert res.stdout == ""


def test_analyze_of_a_capture_needs_no_simulator(tmp_path) -> None:
    """Without the simulator, `analyze FILE` still runs (here: fails on a missing file, in one
    line, not on an import)."""
    res = hushgate_without("hushsim,dpkt,hushsim.synth", "analyze", str(tmp_path / "none.pcap"))
    assert "Traceback" not in res.stderr, res.stderr
    assert "hushsim" not in res.stderr and "dpkt" not in res.stderr, res.stderr
