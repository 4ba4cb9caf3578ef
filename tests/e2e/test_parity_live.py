"""The same burst gets the same judgement live and in `analyze` (issue 13): captured voice
connections are replayed through a real `hushgate run` (tcp_hold = relay) while tcpdump records
the speaker's side at the router; `analyze` then runs over that recording, and each upload the
live guard made pending must be one `analyze` holds (decided within PARITY_S of each other), and
the bursts released as messages must be the same number. The relay and `analyze` share the
framer (guard/core/records.py) and the judge (guard/core/detector.py judge_stream): this test checks the
parts around them (the relay's reads against a capture's reassembly, timers against packets)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from guard.tools.analyze import analyze_capture
from hushsim import timeline as tl
from hushsim.profiles import default_captures_dir
from hushsim.topology import BRIDGE, Topology
from tests.ci import IN_CI
from tests.e2e import replaykit
from tests.e2e.guardkit import MakeGuard, device

QUEUE = 47  # this module's NFQUEUE number (other modules use their own)
# A decision live is taken when the relay reads a record, in analyze when tcpdump saw its last
# segment: the two clocks differ by the relay's read latency, and the judge's timers fire on the
# daemon's loop (timeout granularity) versus exactly in analyze.
PARITY_S = 0.15


def test_live_relay_and_analyze_judge_the_same_bursts(topology: Topology, guards: MakeGuard,
                                                      tmp_path: Path) -> None:
    captures = default_captures_dir()
    if captures is None:
        if IN_CI:
            pytest.fail("../shared/captures is missing")
        pytest.skip("no ../shared/captures")
    conns = tl.voice_connections(captures)
    selection = replaykit.tl.rotating_subset(conns, 0)
    selection.replays = [r for r in selection.replays if replaykit._host_for(r.conn)[0] == "echo"]
    assert selection.uploads >= 2 and selection.messages >= 4, selection
    echo = device(topology, "echo")
    g = guards([echo], tcp_hold="relay")
    pcap = tmp_path / "lan.pcap"
    dump = subprocess.Popen(
        ["ip", "netns", "exec", topology.ns("gw"), "tcpdump", "-i", BRIDGE, "-U",
         "--immediate-mode", "-s", "0",
         "-w", str(pcap), f"tcp and host {echo['address']}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)  # tcpdump is listening
        assert dump.poll() is None, dump.stderr.read() if dump.stderr else ""
        runs, decisions, _ = replaykit.play(g, topology, selection, say=lambda s: None)
        assert not [r.error for r in runs if r.error], [r.error for r in runs]
        status = g.cli_json("status")
        live_released = status["counters"]["bursts_released"]
        live_bursts = status["recent_releases"]
    finally:
        time.sleep(0.5)  # the last packets reach the file before tcpdump stops
        os.kill(dump.pid, signal.SIGINT)
        try:
            dump.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            dump.kill()
            dump.wait(timeout=5.0)
    result = analyze_capture(pcap, devices=[echo["address"]])
    live = sorted(d.started for d in decisions if d.device == "echo")
    offline = sorted(u["decided"] for u in result["uploads"] if u["action"] == "hold")
    t0 = live[0] if live else 0.0
    live_bursts = sorted((r["start"], r["bytes"]) for r in live_bursts)
    offline_bursts = sorted((r["start"], r["bytes"]) for r in result["releases"])
    report = (f"pending live {[round(t - t0, 3) for t in live]}, analyze "
              f"{[round(t - t0, 3) for t in offline]}; released live "
              f"{[(round(t - t0, 3), b) for t, b in live_bursts]}, analyze "
              f"{[(round(t - t0, 3), b) for t, b in offline_bursts]}")
    print(report)
    assert len(live) == len(offline) == selection.uploads, report
    assert all(abs(a - b) <= PARITY_S for a, b in zip(live, offline)), report
    assert live_released == len(live_bursts) == len(offline_bursts), report
    assert all(abs(a[0] - b[0]) <= PARITY_S and a[1] == b[1]
               for a, b in zip(live_bursts, offline_bursts)), report
